"""x402 end to end on the twin: the stock x402 client pays per call (v2, v1, streaming), the relay
serves, the settlement worker settles into the escrow, and the books match the chain exactly."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
from e2e_helpers import OnChain, create_listing, provider_share, settled, wait_for
from fakes import scenarios, start_fake_upstreams
from quotra.store.db import create_engine
from quotra.store.payments_repo import PaymentsRepo
from quotra.store.repositories import Store
from quotra.upstream.localmodel import create_app as localmodel_app
from quotra.upstream.localmodel import run_in_thread
from x402 import x402Client
from x402.http.clients.httpx import x402HttpxClient
from x402.http.x402_http_client import x402HTTPClient
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.schemas.v1 import PaymentRequiredV1

USDC = 10**6


def stock_client(account: Any) -> x402Client:
    client = x402Client()
    register_exact_evm_client(client, account)
    return client


def chat(model: str, content: str = "Hello from the stock x402 client", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def sse_events(text: str) -> list[Any]:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def decode(header: str) -> dict[str, Any]:
    import base64

    return json.loads(base64.b64decode(header))


async def ledger_by_provider(database_url: str) -> dict[str, tuple[int, int]]:
    engine = create_engine(database_url)
    try:
        sums = await PaymentsRepo(Store(engine)).ledger_sums("x402")
    finally:
        await engine.dispose()
    totals: dict[str, tuple[int, int]] = {}
    for (kind, provider), (amount, fee) in sums.items():
        if kind in ("settle", "reconcile"):
            old = totals.get(provider, (0, 0))
            totals[provider] = (old[0] + amount, old[1] + fee)
    return totals


async def test_stock_client_pays_per_call_and_the_worker_settles_90_percent(
    onchain: OnChain, start_relay: Any
) -> None:
    payer = onchain.funded_payer(1 * USDC)
    before = onchain.balance(payer.address)
    local_app = localmodel_app(api_key="sk-local-e2e", models=["quotra-local-1"])
    with run_in_thread(local_app) as (local_url,), start_relay() as relay:
        sandbox = await create_listing(relay.url, models=["sandbox-e2e"], price_per_call="0.0015")
        local = await create_listing(
            relay.url,
            kind="openai-compatible",
            base_url=local_url + "/v1",
            api_key="sk-local-e2e",
            models=["quotra-local-1"],
            price_per_call="0.002",
        )
        paid: dict[str, int] = {}  # settlement id -> amount
        async with x402HttpxClient(stock_client(payer), base_url=relay.url, timeout=30) as http:
            # v2, not streaming: the stock client reads PAYMENT-REQUIRED, signs, retries.
            for _ in range(2):
                reply = await http.post("/v1/chat/completions", json=chat("sandbox-e2e"))
                assert reply.status_code == 200, reply.text
                assert "Sandbox reply to" in reply.json()["choices"][0]["message"]["content"]
                response = decode(reply.headers["payment-response"])
                assert response["success"] and response["payer"] == payer.address
                paid[response["settlement"]] = 1_500
            # v2, streaming, through a real OpenAI-compatible upstream over HTTP.
            async with http.stream(
                "POST", "/v1/chat/completions", json=chat("quotra-local-1", stream=True)
            ) as stream:
                assert stream.status_code == 200
                pending = decode(stream.headers["payment-response"])
                assert pending["transaction"] == "" and pending["extra"]["status"] == "pending"
                events = sse_events((await stream.aread()).decode())
            assert events[-1] == "[DONE]"
            event = events[-2]["quotra"]
            assert event["settlement"] == pending["settlement"] and event["status"] == "pending"
            paid[pending["settlement"]] = 2_000

        # v1: the SDK's v1 scheme signs the requirements of the 402 body; X-PAYMENT goes back.
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as plain:
            body = chat(f"listing/{sandbox['id']}")
            first = await plain.post("/v1/chat/completions", json=body)
            assert first.status_code == 402
            required_v1 = PaymentRequiredV1(accepts=first.json()["accepts"])
            payload = await stock_client(payer).create_payment_payload(required_v1)
            headers = x402HTTPClient(stock_client(payer)).encode_payment_signature_header(payload)
            assert list(headers) == ["X-PAYMENT"]
            reply = await plain.post("/v1/chat/completions", json=body, headers=headers)
            assert reply.status_code == 200, reply.text
            response_v1 = decode(reply.headers["x-payment-response"])
            assert response_v1["network"] == "base-sepolia"
            paid[response_v1["settlement"]] = 1_500

            # The OpenAI SDK streams a paid call (payment header passed along) and takes the
            # final settlement event as one more chunk.
            offer = decode(
                (await plain.post("/v1/chat/completions", json=chat("sandbox-e2e"))).headers[
                    "payment-required"
                ]
            )
            from x402.schemas import PaymentRequired

            payload2 = await stock_client(payer).create_payment_payload(PaymentRequired.model_validate(offer))
            sdk = openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key="unused", max_retries=0)
            stream = await sdk.chat.completions.create(
                model="sandbox-e2e",
                messages=[{"role": "user", "content": "stream me, SDK"}],
                stream=True,
                # the payment is the credential: no API key goes with it
                extra_headers={
                    **x402HTTPClient(stock_client(payer)).encode_payment_signature_header(payload2),
                    "Authorization": openai.Omit(),
                },
            )
            chunks = [chunk async for chunk in stream]
            await sdk.close()
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert "stream me, SDK" in text
            final = chunks[-1].model_extra["quotra"]
            assert final["object"] == "quotra.settlement" and final["charged"] is True
            paid[final["settlement"]] = 1_500

        statuses = {sid: await settled(relay.url, sid) for sid in paid}
        assert {s["status"] for s in statuses.values()} == {"settled"}, statuses
        assert all(s["transaction"] and s["transaction"].startswith("0x") for s in statuses.values())

    total = sum(paid.values())
    assert onchain.balance(payer.address) == before - total
    assert onchain.earnings(sandbox["owner"]) == sum(provider_share(a) for a in paid.values() if a == 1_500)
    assert onchain.earnings(local["owner"]) == provider_share(2_000)
    assert onchain.solvent()
    books = await ledger_by_provider(start_relay.database_url)
    assert books[sandbox["owner"]][0] - books[sandbox["owner"]][1] == onchain.earnings(sandbox["owner"])
    assert books[local["owner"]] == (2_000, 2_000 * 1_000 // 10_000)


async def test_failed_upstream_calls_are_never_charged(onchain: OnChain, start_relay: Any) -> None:
    """5xx, timeout and a stream that breaks mid-way: voided, and the payer keeps its USDC."""
    payer = onchain.funded_payer(USDC)
    before = onchain.balance(payer.address)
    with start_fake_upstreams() as fakes, start_relay(upstream_timeout_seconds=1.0) as relay:
        listing = await create_listing(
            relay.url,
            kind="openai-compatible",
            base_url=fakes.base_urls["openai-compatible"],
            api_key=fakes.api_key,
            models=[scenarios.MODEL, scenarios.error_model(503), scenarios.SLOW, scenarios.BREAK],
            price_per_call="0.001",
        )
        lid = listing["id"]
        async with x402HttpxClient(stock_client(payer), base_url=relay.url, timeout=30) as http:
            failed = []
            for model in (scenarios.error_model(503), scenarios.SLOW):
                reply = await http.post("/v1/chat/completions", json=chat(f"listing/{lid}/{model}"))
                assert reply.status_code in (502, 504), reply.text
                assert "nothing was charged" in reply.json()["error"]["message"]
                failed.append(
                    decode(reply.headers["payment-response"]) if "payment-response" in reply.headers else None
                )
            async with http.stream(
                "POST", "/v1/chat/completions", json=chat(f"listing/{lid}/{scenarios.BREAK}", stream=True)
            ) as stream:
                assert stream.status_code == 200
                broken = decode(stream.headers["payment-response"])["settlement"]
                await stream.aread()
            ok = await http.post("/v1/chat/completions", json=chat(f"listing/{lid}/{scenarios.MODEL}"))
            assert ok.status_code == 200
            good = decode(ok.headers["payment-response"])["settlement"]
        assert (await settled(relay.url, broken))["status"] == "voided"
        assert (await settled(relay.url, good))["status"] == "settled"
        async with httpx.AsyncClient(base_url=relay.url) as client:
            for n in range(1, 5):
                status = (await client.get(f"/v1/settlements/x402_{n}")).json()
                assert status["status"] == ("settled" if f"x402_{n}" == good else "voided"), status
    assert onchain.balance(payer.address) == before - 1_000
    assert onchain.earnings(listing["owner"]) == provider_share(1_000)


async def test_relay_stopped_after_capture_settles_after_restart_once(
    onchain: OnChain, start_relay: Any
) -> None:
    payer = onchain.funded_payer(USDC)
    with start_relay(settlement_enabled=False) as first:
        listing = await create_listing(first.url, models=["restart-model"], price_per_call="0.003")
        async with x402HttpxClient(stock_client(payer), base_url=first.url, timeout=30) as http:
            reply = await http.post("/v1/chat/completions", json=chat("restart-model"))
            assert reply.status_code == 200
            sid = decode(reply.headers["payment-response"])["settlement"]
        async with httpx.AsyncClient(base_url=first.url) as client:
            assert (await client.get(f"/v1/settlements/{sid}")).json()["status"] == "pending"
    assert onchain.earnings(listing["owner"]) == 0  # captured, not settled: the relay stopped
    with start_relay() as second:  # same database, settlement on
        assert (await settled(second.url, sid))["status"] == "settled"
    with start_relay() as third:  # once more: nothing is sent again
        async with httpx.AsyncClient(base_url=third.url) as client:

            async def still_settled() -> bool:
                return (await client.get(f"/v1/settlements/{sid}")).json()["status"] == "settled"

            await wait_for(still_settled)
    assert onchain.earnings(listing["owner"]) == provider_share(3_000)
