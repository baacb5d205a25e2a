"""The relay when its chain goes away: refused (the node is down), hung (it accepts and never
answers) and absent when the relay starts. Prepaid calls go on; x402 calls answer 503 with
Retry-After within the chain read deadline, charging nothing; readiness stays up and says what is
degraded; and once the chain is back, x402 and settlement resume by themselves within seconds."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from e2e_helpers import ChainProxy, OnChain
from eth_account import Account
from relays import (
    FINAL_STATES,
    RelayProcess,
    X402Payer,
    all_calls,
    chat,
    create_listing,
    free_port,
    prepaid_key,
    relay_env,
    relays,
    wait_until,
)

USDC = 10**6
PRICE = 1_000  # 0.001 USDC
DEADLINE = 1.5  # QUOTRA_CHAIN_READ_TIMEOUT_SECONDS in these tests


@pytest.fixture
async def proxy(onchain: OnChain) -> AsyncIterator[ChainProxy]:
    chain = ChainProxy(onchain.twin.port)
    try:
        yield chain
    finally:
        await chain.close()


def relay_behind(proxy: ChainProxy, onchain: OnChain, database_url: str, tmp_path: Any) -> RelayProcess:
    port = free_port()
    env = relay_env(
        onchain,
        database_url,
        port,
        tmp_path / "data",
        QUOTRA_CHAIN_RPC_URL=proxy.url,
        QUOTRA_CHAIN_READ_TIMEOUT_SECONDS=str(DEADLINE),
        QUOTRA_X402_HEAD_CACHE_SECONDS="0.5",
        QUOTRA_ESCROW_START_BLOCK=str(onchain.chain.w3.eth.block_number),
    )
    return RelayProcess("relay", env, port, tmp_path)


async def paid(relay: RelayProcess, listing_id: str, payer: X402Payer) -> tuple[httpx.Response, float]:
    header, _ = payer.header()
    async with httpx.AsyncClient(base_url=relay.url, timeout=60) as client:
        started = time.monotonic()
        reply = await client.post(
            "/v1/chat/completions", json=chat(listing_id, False), headers={"PAYMENT-SIGNATURE": header}
        )
        return reply, time.monotonic() - started


async def prepaid(relay: RelayProcess, listing_id: str, key: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=relay.url, timeout=60) as client:
        return await client.post(
            "/v1/chat/completions", json=chat(listing_id, False), headers={"Authorization": f"Bearer {key}"}
        )


async def readiness(relay: RelayProcess) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as client:
        reply = await client.get("/readyz")
        return reply.status_code, reply.json()


async def ready(relay: RelayProcess) -> bool:
    status, body = await readiness(relay)
    return status == 200 and body["status"] == "ready"


def unavailable(reply: httpx.Response) -> None:
    """A clean 503: retry later, nothing charged."""
    assert reply.status_code == 503, reply.text
    assert int(reply.headers["retry-after"]) >= 1
    assert "nothing was charged" in reply.json()["error"]["message"].lower()


@pytest.mark.parametrize("outage", ["refuse", "hang"])
async def test_chain_down_while_serving(
    outage: str, proxy: ChainProxy, onchain: OnChain, database_url: str, tmp_path: Any
) -> None:
    await proxy.set("forward")
    relay = relay_behind(proxy, onchain, database_url, tmp_path)
    with relays(relay):
        relay.start()  # blocks this loop, so the proxy forwards only from now on: the relay retries
        await wait_until(lambda: ready(relay), 20, "x402 on")
        listing = await create_listing(
            relay.url, Account.create(), models=["outage-model"], price_per_call="0.001"
        )
        _, key = await prepaid_key(onchain, relay.url, deposit=USDC, allowance=USDC)
        before = await X402Payer.funded(onchain, relay.url, listing["id"], 10 * PRICE)
        served, _ = await paid(relay, listing["id"], before)
        assert served.status_code == 200, served.text

        await proxy.set(outage)
        # A payer the relay has not seen: its balance must be read, and cannot be.
        stranger = X402Payer(onchain, Account.create(), before.offer)
        onchain.twin.mint_usdc(stranger.account.address, 10 * PRICE)
        reply, took = await paid(relay, listing["id"], stranger)
        unavailable(reply)
        assert reply.json()["error"]["code"] == "payment_verification_unavailable"
        assert took < DEADLINE + 2.5, f"the 503 took {took:.1f} s"
        # Prepaid calls are served from the budgets the relay knows.
        for _ in range(3):
            assert (await prepaid(relay, listing["id"], key)).status_code == 200
        status, body = await readiness(relay)
        assert (status, body["status"]) == (200, "degraded") and body["checks"]["chain"]["ok"] is False
        assert body["checks"]["database"]["ok"] is True

        await proxy.set("forward")
        back = time.monotonic()

        async def x402_again() -> bool:
            reply, _ = await paid(relay, listing["id"], stranger)
            return reply.status_code == 200

        await wait_until(x402_again, 20, "x402 served again")
        recovered = time.monotonic() - back

        async def all_settled() -> bool:
            calls = await all_calls(database_url, [listing["id"]])
            return all(c.state in FINAL_STATES for c in calls)

        await wait_until(all_settled, 30, "every call settled")
        settled = time.monotonic() - back
        calls = await all_calls(database_url, [listing["id"]])
        # Nothing charged for the refused call: 2 x402 calls and 3 prepaid calls, all settled.
        assert (
            sorted((c.gate, c.state) for c in calls)
            == [("prepaid", "settled")] * 3 + [("x402", "settled")] * 2
        )
        assert onchain.balance(stranger.account.address) == 9 * PRICE
        print(
            f"\n{outage}: x402 back {recovered:.1f} s and everything settled {settled:.1f} s after the chain"
        )
        assert recovered < 10 and settled < 20


async def test_relay_started_with_the_chain_down(
    proxy: ChainProxy, onchain: OnChain, database_url: str, tmp_path: Any
) -> None:
    relay = relay_behind(proxy, onchain, database_url, tmp_path)  # the proxy refuses: no chain
    with relays(relay):
        relay.start()
        status, body = await readiness(relay)
        assert (status, body["status"]) == (200, "degraded")
        assert body["checks"]["x402"] == {
            "ok": False,
            "error": "waiting for the chain: x402 calls answer 503",
        }
        assert body["checks"]["settlement"]["ok"] is False
        listing = await create_listing(
            relay.url, Account.create(), models=["outage-model"], price_per_call="0.001"
        )
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as client:
            reply = await client.post(
                "/v1/chat/completions",
                json=chat(listing["id"], False),
                headers={"PAYMENT-SIGNATURE": "e30="},  # "{}": a payment, whatever it holds
            )
        unavailable(reply)
        assert reply.json()["error"]["code"] == "x402_unavailable"

        await proxy.set("forward")
        back = time.monotonic()
        await wait_until(lambda: ready(relay), 20, "x402 and settlement on")
        recovered = time.monotonic() - back
        payer = await X402Payer.funded(onchain, relay.url, listing["id"], 10 * PRICE)
        reply, _ = await paid(relay, listing["id"], payer)
        assert reply.status_code == 200, reply.text

        async def settled() -> bool:
            calls = await all_calls(database_url, [listing["id"]])
            return [c.state for c in calls] == ["settled"]

        await wait_until(settled, 20, "the paid call settled")
        assert onchain.balance(payer.account.address) == 9 * PRICE
        print(f"\nstarted without a chain: ready {recovered:.1f} s after the chain came back")
        assert recovered < 10
