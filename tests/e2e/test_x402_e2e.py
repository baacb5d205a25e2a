"""x402 end to end on the twin: the stock x402 client pays per call (v2, v1, streaming), the relay
serves, the settlement worker settles into the escrow, and the relay's settled calls match the
escrow's credits exactly. Every answer names its call; its payer (and only its payer) follows it at
`GET /v1/calls/{id}`; a payment presented again is answered with its call, never served twice."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import openai
from e2e_helpers import (
    FEE_BPS,
    MAX_BPS,
    OnChain,
    create_listing,
    deploy_escrow,
    provider_share,
    settled,
    settled_books,
    sign_in,
    wait_for,
)
from eth_account import Account
from fakes import scenarios, start_fake_upstreams
from quotra_dev.localmodel import create_app as localmodel_app
from quotra_dev.localmodel import run_in_thread
from x402 import x402Client
from x402.http.clients.httpx import x402HttpxClient
from x402.http.x402_http_client import x402HTTPClient
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.schemas import PaymentRequired
from x402.schemas.v1 import PaymentRequiredV1

USDC = 10**6
CALL_HEADER = "quotra-call-id"


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
    return json.loads(base64.b64decode(header))


def fee(amount: int) -> int:
    return amount * FEE_BPS // MAX_BPS


def call_of(reply: httpx.Response, header: str = "payment-response") -> str:
    """The call a paid answer names: `Quotra-Call-Id`, and the same id in its PAYMENT-RESPONSE."""
    response = decode(reply.headers[header])
    call_id = reply.headers[CALL_HEADER]
    assert call_id.startswith("call_")
    assert response["call"] == response["extra"]["call"] == call_id, response
    assert response["extra"]["status"] == "pending" and response["transaction"] == ""
    return call_id


async def signed_payment(http: httpx.AsyncClient, payer: Any, body: dict[str, Any]) -> dict[str, str]:
    """A v2 PAYMENT-SIGNATURE header for `body`, signed by the stock client from the 402's offer."""
    offer = await http.post("/v1/chat/completions", json=body)
    assert offer.status_code == 402, offer.text
    required = PaymentRequired.model_validate(decode(offer.headers["payment-required"]))
    payload = await stock_client(payer).create_payment_payload(required)
    return x402HTTPClient(stock_client(payer)).encode_payment_signature_header(payload)


async def test_stock_client_pays_per_call_and_the_worker_settles_90_percent(
    onchain: OnChain, start_relay: Any
) -> None:
    payer = onchain.funded_payer(1 * USDC)
    before = onchain.balance(payer.address)
    local_app = localmodel_app(api_key="sk-local-e2e", models=["quotra-local-1"])
    with run_in_thread(local_app) as (local_url,), start_relay() as relay:
        session = await sign_in(relay.url, payer)
        sandbox = await create_listing(relay.url, models=["sandbox-e2e"], price_per_call="0.0015")
        local = await create_listing(
            relay.url,
            kind="openai-compatible",
            base_url=local_url + "/v1",
            api_key="sk-local-e2e",
            models=["quotra-local-1"],
            price_per_call="0.002",
        )
        # call id -> (amount, provider, the credential its payer asks about it with)
        paid: dict[str, tuple[int, str, dict[str, str]]] = {}
        async with x402HttpxClient(stock_client(payer), base_url=relay.url, timeout=30) as http:
            # v2, not streaming: the stock client reads PAYMENT-REQUIRED, signs, retries.
            for _ in range(2):
                reply = await http.post("/v1/chat/completions", json=chat("sandbox-e2e"))
                assert reply.status_code == 200, reply.text
                assert "Sandbox reply to" in reply.json()["choices"][0]["message"]["content"]
                response = decode(reply.headers["payment-response"])
                assert response["success"] and response["payer"] == payer.address
                assert response["amount"] == "1500"
                paid[call_of(reply)] = (1_500, sandbox["owner"], session)
            # v2, streaming, through a real OpenAI-compatible upstream over HTTP.
            async with http.stream(
                "POST", "/v1/chat/completions", json=chat("quotra-local-1", stream=True)
            ) as stream:
                assert stream.status_code == 200
                streamed = call_of(stream)
                events = sse_events((await stream.aread()).decode())
            assert events[-1] == "[DONE]"
            event = events[-2]["quotra"]
            assert event["object"] == "quotra.payment" and event["call"] == streamed
            assert (event["status"], event["charged"], event["amount"]) == ("pending", True, "2000")
            paid[streamed] = (2_000, local["owner"], session)

        # v1: the SDK's v1 scheme signs the requirements of the 402 body; X-PAYMENT goes back.
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as plain:
            body = chat(f"listing/{sandbox['id']}")
            first = await plain.post("/v1/chat/completions", json=body)
            assert first.status_code == 402
            required_v1 = PaymentRequiredV1(accepts=first.json()["accepts"])
            payload = await stock_client(payer).create_payment_payload(required_v1)
            v1_payment = x402HTTPClient(stock_client(payer)).encode_payment_signature_header(payload)
            assert list(v1_payment) == ["X-PAYMENT"]
            reply = await plain.post("/v1/chat/completions", json=body, headers=v1_payment)
            assert reply.status_code == 200, reply.text
            assert "payment-response" not in reply.headers
            assert decode(reply.headers["x-payment-response"])["network"] == "base-sepolia"
            # asked about with the payment that paid for it, no session
            paid[call_of(reply, "x-payment-response")] = (1_500, sandbox["owner"], v1_payment)

            # The OpenAI SDK streams a paid call (payment header passed along) and takes the
            # final payment event as one more chunk.
            v2_payment = await signed_payment(plain, payer, chat("sandbox-e2e"))
            sdk = openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key="unused", max_retries=0)
            stream = await sdk.chat.completions.create(
                model="sandbox-e2e",
                messages=[{"role": "user", "content": "stream me, SDK"}],
                stream=True,
                # the payment is the credential: no API key goes with it
                extra_headers={**v2_payment, "Authorization": openai.Omit()},
            )
            chunks = [chunk async for chunk in stream]
            await sdk.close()
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert "stream me, SDK" in text
            final = chunks[-1].model_extra["quotra"]
            assert final["object"] == "quotra.payment" and final["charged"] is True
            assert final["call"].startswith("call_")
            paid[final["call"]] = (1_500, sandbox["owner"], v2_payment)

            calls = {cid: await settled(relay.url, cid, auth) for cid, (_, _, auth) in paid.items()}
            for cid, (amount, provider, _) in paid.items():
                call = calls[cid]
                assert (call["id"], call["gate"], call["state"], call["charged"]) == (
                    cid,
                    "x402",
                    "settled",
                    True,
                )
                assert (call["amount_atomic"], call["fee_atomic"]) == (amount, fee(amount)), call
                assert call["provider"] == provider and call["outcome"] == "ok"
                assert call["transaction"] and call["transaction"].startswith("0x")
            assert calls[streamed]["stream"] is True and calls[streamed]["usage"]["completion_tokens"] > 0

            # Only the payer learns about its calls: no credential, another wallet's session, or
            # another call's payment are all told the call does not exist.
            stranger = await sign_in(relay.url, Account.create())
            v1_call = next(cid for cid, (*_, auth) in paid.items() if auth is v1_payment)
            for cid, headers in ((streamed, {}), (streamed, stranger), (streamed, v2_payment), (v1_call, {})):
                reply = await plain.get(f"/v1/calls/{cid}", headers=headers)
                assert (reply.status_code, reply.json()["error"]["code"]) == (404, "call_not_found")
            # The payer's session sees every call of its wallet, whichever way it was paid.
            usage = (await plain.get("/v1/account/usage", headers=session)).json()["data"]
            assert {(u["id"], u["gate"], u["status"]) for u in usage} == {
                (cid, "x402", "settled") for cid in paid
            }

    total = sum(amount for amount, _, _ in paid.values())
    assert onchain.balance(payer.address) == before - total
    sandbox_paid = [amount for amount, provider, _ in paid.values() if provider == sandbox["owner"]]
    assert sandbox_paid == [1_500] * 4
    assert onchain.earnings(sandbox["owner"]) == sum(provider_share(a) for a in sandbox_paid)
    assert onchain.earnings(local["owner"]) == provider_share(2_000)
    assert onchain.solvent()
    # The relay's settled calls, per provider, are exactly what the escrow credited them.
    books = await settled_books(start_relay.database_url)
    assert books == {
        sandbox["owner"]: onchain.credited(sandbox["owner"]),
        local["owner"]: onchain.credited(local["owner"]),
    }
    assert books[sandbox["owner"]] == (6_000, 4 * fee(1_500))
    assert books[local["owner"]] == (2_000, fee(2_000))
    assert books[sandbox["owner"]][0] - books[sandbox["owner"]][1] == onchain.earnings(sandbox["owner"])


async def test_failed_upstream_calls_are_never_charged(onchain: OnChain, start_relay: Any) -> None:
    """5xx, timeout and a stream that breaks mid-way: voided, and the payer keeps its USDC; the
    payment of a failed call is not used up: it pays for the retry, once."""
    payer = onchain.funded_payer(USDC)
    before = onchain.balance(payer.address)
    with start_fake_upstreams() as fakes, start_relay(upstream_timeout_seconds=1.0) as relay:
        session = await sign_in(relay.url, payer)
        listing = await create_listing(
            relay.url,
            kind="openai-compatible",
            base_url=fakes.base_urls["openai-compatible"],
            api_key=fakes.api_key,
            models=[scenarios.MODEL, scenarios.error_model(503), scenarios.SLOW, scenarios.BREAK],
            price_per_call="0.001",
        )
        lid = listing["id"]
        voided = []
        async with x402HttpxClient(stock_client(payer), base_url=relay.url, timeout=30) as http:
            for model in (scenarios.error_model(503), scenarios.SLOW):
                reply = await http.post("/v1/chat/completions", json=chat(f"listing/{lid}/{model}"))
                assert reply.status_code in (502, 504), reply.text
                assert "nothing was charged" in reply.json()["error"]["message"]
                voided.append(reply.headers[CALL_HEADER])  # named though it failed
            async with http.stream(
                "POST", "/v1/chat/completions", json=chat(f"listing/{lid}/{scenarios.BREAK}", stream=True)
            ) as stream:
                assert stream.status_code == 200
                voided.append(call_of(stream))
                await stream.aread()
            ok = await http.post("/v1/chat/completions", json=chat(f"listing/{lid}/{scenarios.MODEL}"))
            assert ok.status_code == 200
            good = [call_of(ok)]
        # A payment whose call failed was never used: it pays for the retry, once.
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as plain:
            failing, working = (
                chat(f"listing/{lid}/{m}") for m in (scenarios.error_model(503), scenarios.MODEL)
            )
            payment = await signed_payment(plain, payer, failing)
            reply = await plain.post("/v1/chat/completions", json=failing, headers=payment)
            assert reply.status_code == 502, reply.text
            voided.append(reply.headers[CALL_HEADER])
            retry = await plain.post("/v1/chat/completions", json=working, headers=payment)
            assert retry.status_code == 200, retry.text
            good.append(call_of(retry))
            assert good[-1] != voided[-1]
            again = await plain.post("/v1/chat/completions", json=working, headers=payment)
            assert (again.status_code, again.json()["error"]["code"]) == (409, "payment_already_used")
            assert again.headers[CALL_HEADER] == good[-1]
        for cid in voided:
            call = await settled(relay.url, cid, session)
            assert (call["state"], call["charged"], call["amount_atomic"]) == ("voided", False, 0), call
            assert call["outcome"] == "upstream_error" and call["transaction"] is None
        for cid in good:
            call = await settled(relay.url, cid, session)
            assert (call["state"], call["amount_atomic"], call["fee_atomic"]) == (
                "settled",
                1_000,
                fee(1_000),
            )
        # Every call the payer made is accounted for: two settled, the four failures voided.
        async with httpx.AsyncClient(base_url=relay.url) as client:
            usage = (await client.get("/v1/account/usage", headers=session)).json()["data"]
        assert sorted((u["id"], u["status"], u["price_atomic"]) for u in usage) == sorted(
            [(cid, "settled", 1_000) for cid in good] + [(cid, "voided", 0) for cid in voided]
        )
    assert onchain.balance(payer.address) == before - 2 * 1_000
    assert onchain.earnings(listing["owner"]) == 2 * provider_share(1_000)
    assert await settled_books(start_relay.database_url) == {
        listing["owner"]: onchain.credited(listing["owner"])
    }
    assert onchain.credited(listing["owner"]) == (2 * 1_000, 2 * fee(1_000))


async def test_relay_stopped_after_capture_settles_after_restart_once(
    onchain: OnChain, start_relay: Any
) -> None:
    payer = onchain.funded_payer(USDC)
    with start_relay(settlement_enabled=False) as first:
        session = await sign_in(first.url, payer)
        listing = await create_listing(first.url, models=["restart-model"], price_per_call="0.003")
        async with x402HttpxClient(stock_client(payer), base_url=first.url, timeout=30) as http:
            reply = await http.post("/v1/chat/completions", json=chat("restart-model"))
            assert reply.status_code == 200
            cid = call_of(reply)
        async with httpx.AsyncClient(base_url=first.url) as client:
            call = (await client.get(f"/v1/calls/{cid}", headers=session)).json()
        assert (call["state"], call["charged"], call["transaction"]) == ("captured", True, None)
    assert onchain.earnings(listing["owner"]) == 0  # captured, not settled: the relay stopped
    with start_relay() as second:  # same database, settlement on (the session outlives the restart)
        call = await settled(second.url, cid, session)
        assert (call["state"], call["amount_atomic"]) == ("settled", 3_000)
        tx = call["transaction"]
    with start_relay() as third:  # once more: nothing is sent again
        async with httpx.AsyncClient(base_url=third.url) as client:

            async def still_settled() -> bool:
                call = (await client.get(f"/v1/calls/{cid}", headers=session)).json()
                return bool(call["state"] == "settled" and call["transaction"] == tx)

            await wait_for(still_settled)
    assert onchain.earnings(listing["owner"]) == provider_share(3_000)
    assert onchain.credited(listing["owner"]) == (3_000, fee(3_000))  # credited once
    assert await settled_books(start_relay.database_url) == {listing["owner"]: (3_000, fee(3_000))}


async def test_replayed_payment_answers_its_call_and_is_never_served_or_charged_again(
    onchain: OnChain, start_relay: Any
) -> None:
    """The same PAYMENT-SIGNATURE sent again — while its call awaits settlement and after it
    settled — is answered `409 payment_already_used` with that call's outcome: no completion, no
    new call, no second charge."""
    payer = onchain.funded_payer(USDC)
    before = onchain.balance(payer.address)

    async def replay(url: str, body: dict[str, Any], payment: dict[str, str], cid: str) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            reply = await client.post("/v1/chat/completions", json=body, headers=payment)
        assert reply.status_code == 409, reply.text
        assert reply.headers[CALL_HEADER] == cid
        assert "payment-response" not in reply.headers
        answer = reply.json()
        assert "choices" not in answer
        assert answer["error"]["code"] == "payment_already_used" and cid in answer["error"]["message"]
        call: dict[str, Any] = answer["error"]["call"]
        assert (call["id"], call["gate"], call["charged"], call["amount_atomic"]) == (
            cid,
            "x402",
            True,
            2_500,
        )
        return call

    with start_relay(settlement_enabled=False) as first:
        session = await sign_in(first.url, payer)
        listing = await create_listing(first.url, models=["replay-model"], price_per_call="0.0025")
        body = chat("replay-model")
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
            payment = await signed_payment(client, payer, body)
            reply = await client.post("/v1/chat/completions", json=body, headers=payment)
            assert reply.status_code == 200, reply.text
            cid = call_of(reply)
            # Not settled yet: the relay's own record of the nonce refuses it.
            assert (await replay(first.url, body, payment, cid))["state"] == "captured"
            # The payment that paid for it is the credential to ask about it.
            call = (await client.get(f"/v1/calls/{cid}", headers=payment)).json()
            assert (call["id"], call["state"]) == (cid, "captured")
    with start_relay() as second:
        assert (await settled(second.url, cid, payment))["state"] == "settled"
        # Settled (USDC marks the nonce used): still answered with the call, not a bare refusal.
        call = await replay(second.url, body, payment, cid)
        assert call["state"] == "settled" and call["transaction"].startswith("0x")
        async with httpx.AsyncClient(base_url=second.url) as client:
            usage = (await client.get("/v1/account/usage", headers=session)).json()["data"]
        assert [(u["id"], u["status"]) for u in usage] == [(cid, "settled")]  # served once
    assert onchain.balance(payer.address) == before - 2_500  # charged once
    assert onchain.earnings(listing["owner"]) == provider_share(2_500)
    assert onchain.credited(listing["owner"]) == (2_500, fee(2_500))


async def test_a_payer_cannot_spend_more_than_its_usdc_while_payments_await_settlement(
    onchain: OnChain, start_relay: Any
) -> None:
    """The payer's USDC balance at the chain's head, less its payments not settled yet, bounds what
    it can pay: a payment it could not cover is refused before anything is served or recorded; after
    a top-up on-chain the next one is served; every call served is settled in full."""
    payer = onchain.funded_payer(3_000)  # one call of 2 000 and half of another
    with start_relay(settlement_enabled=False, x402_head_cache_seconds=0.0) as first:
        session = await sign_in(first.url, payer)
        listing = await create_listing(first.url, models=["budget-model"], price_per_call="0.002")
        body = chat("budget-model")
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
            paid = await client.post(
                "/v1/chat/completions", json=body, headers=await signed_payment(client, payer, body)
            )
            assert paid.status_code == 200, paid.text
            served = [call_of(paid)]
            # Its 2 000 are still in the payer's wallet (not settled): they count all the same.
            refused = await client.post(
                "/v1/chat/completions", json=body, headers=await signed_payment(client, payer, body)
            )
            assert refused.status_code == 402, refused.text
            assert refused.json()["error"]["code"] == "invalid_exact_evm_insufficient_balance"
            assert (
                decode(refused.headers["payment-required"])["error"]
                == "invalid_exact_evm_insufficient_balance"
            )
            assert "choices" not in refused.json() and CALL_HEADER not in refused.headers
            onchain.twin.mint_usdc(payer.address, 1_000)  # a new block: 4 000, two calls' worth
            topped_up = await client.post(
                "/v1/chat/completions", json=body, headers=await signed_payment(client, payer, body)
            )
            assert topped_up.status_code == 200, topped_up.text
            served.append(call_of(topped_up))
            usage = (await client.get("/v1/account/usage", headers=session)).json()["data"]
            assert sorted(u["id"] for u in usage) == sorted(served)  # the refused one left no call
    with start_relay() as second:
        for cid in served:
            assert (await settled(second.url, cid, session))["state"] == "settled"
    assert onchain.balance(payer.address) == 0
    assert onchain.earnings(listing["owner"]) == 2 * provider_share(2_000)
    assert onchain.credited(listing["owner"]) == (4_000, 2 * fee(2_000))


async def test_per_token_call_charges_what_it_used_and_returns_the_rest_to_the_payers_deposit(
    onchain: OnChain, start_relay: Any
) -> None:
    """The stock client signs for the listing's maximum; the call is charged the tokens it used:
    the provider is credited 90 % and the platform 10 % of the charge, the rest of the
    authorization lands in the payer's escrow deposit in the same settlement, and the payer
    withdraws it. An escrow of its own, without a withdrawal delay (the twin's clock stays put)."""
    own = deploy_escrow(onchain.twin, withdrawal_delay=0)
    payer = onchain.funded_payer(1 * USDC)
    before = onchain.balance(payer.address)
    with start_relay(escrow_address=own.escrow.address, escrow_start_block=own.start_block) as relay:
        session = await sign_in(relay.url, payer)
        listing = await create_listing(
            relay.url,
            models=["per-token-e2e"],
            price_per_call="0.001",
            price_output_per_mtok="10",
            max_output_tokens=1000,
        )
        async with x402HttpxClient(stock_client(payer), base_url=relay.url, timeout=30) as http:
            reply = await http.post("/v1/chat/completions", json=chat("per-token-e2e"))
        assert reply.status_code == 200, reply.text
        authorized = 1_000 + 1000 * 10  # the offer: 1000 output tokens at most
        charged = 1_000 + reply.json()["usage"]["completion_tokens"] * 10
        assert charged < authorized
        response = decode(reply.headers["payment-response"])
        assert response["amount"] == str(charged)
        assert response["extra"]["authorized"] == str(authorized)
        assert response["extra"]["returned_to_deposit"] == str(authorized - charged)
        call = await settled(relay.url, call_of(reply), session)
        assert (call["state"], call["amount_atomic"], call["fee_atomic"]) == (
            "settled",
            charged,
            fee(charged),
        )
        assert (call["reserved_atomic"], call["returned_to_deposit_atomic"]) == (
            authorized,
            authorized - charged,
        )
        async with httpx.AsyncClient(base_url=relay.url) as client:
            (usage,) = (await client.get("/v1/account/usage", headers=session)).json()["data"]
        assert (usage["price_atomic"], usage["returned_to_deposit_atomic"]) == (charged, authorized - charged)
        books = await settled_books(start_relay.database_url)
    # The whole authorization came in; the charge was split, the rest is the payer's deposit.
    assert onchain.balance(payer.address) == before - authorized
    assert own.deposit(payer.address) == authorized - charged
    assert own.earnings(listing["owner"]) == provider_share(charged)
    assert own.escrow.functions.platform_fees().call() == fee(charged)
    assert own.credited(listing["owner"]) == books[listing["owner"]] == (charged, fee(charged))
    assert own.excess() == 0  # escrow balance == liabilities()
    # Withdrawable like any deposit.
    onchain.twin.fund_eth(payer.address, 10**16)
    own.chain.transact(own.escrow.functions.request_withdrawal(authorized - charged), payer)
    own.chain.transact(own.escrow.functions.withdraw(), payer)
    assert onchain.balance(payer.address) == before - charged
    assert own.deposit(payer.address) == 0
    assert own.excess() == 0
