"""Money under crashes and replicas, with real processes on the twin (issue 9).

- A relay is SIGKILLed in the middle of a mixed load of prepaid and x402 calls (streamed and not)
  on a per-token listing, restarted, killed again while a settlement transaction is in flight
  (blocks mined every 2 s), and restarted: afterwards every answered call was charged exactly once,
  what it used (an x402 payer's unused rest of each authorization in its escrow deposit), no
  refused or failed call was charged, nothing settled twice, no reservation is left, `quotra
  reconcile` is clean and the escrow holds exactly what it owes.
- Two relays on one database (PostgreSQL when provided): an x402 payer funded for exactly N calls,
  and prepaid keys budgeted for exactly N calls by deposit, by permission and by key cap, each sent
  10 x N concurrent calls across both relays: at most N served, each paid on chain. The settlement
  leader is killed before it settles; the other relay takes over.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
from e2e_helpers import OnChain, provider_share
from eth_account import Account
from quotra.calls.records import OPEN
from relays import (
    FINAL_STATES,
    USDC,
    Outcome,
    RelayProcess,
    X402Payer,
    all_calls,
    call,
    create_listing,
    free_port,
    prepaid_key,
    quotra_cli,
    relay_env,
    relays,
    wait_until,
)

PRICE = 1_000  # 0.001 USDC a call
PER_TOKEN = 10  # the per-token listing's price per output token (10 USDC per million)…
MAX_TOKENS = 100  # …of at most this many: an x402 payment authorizes PRICE + 1 000


def cost(completion_tokens: int) -> int:
    """What a call on the per-token listing is charged for the tokens it used."""
    return PRICE + PER_TOKEN * completion_tokens


async def mixed_load(
    url: str, listing_id: str, payers: list[X402Payer], api_key: str, n: int, *, seed: int
) -> list[Outcome]:
    """`n` concurrent calls: x402 or prepaid, streamed or not, each x402 one with a new payment."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        jobs = []
        for i in range(n):
            stream = rng.random() < 0.4
            if rng.random() < 0.5:
                header, nonce = payers[i % len(payers)].header()
                jobs.append(
                    call(
                        client,
                        listing_id,
                        stream=stream,
                        headers={"PAYMENT-SIGNATURE": header},
                        kind="x402",
                        nonce=nonce,
                    )
                )
            else:
                auth = {"Authorization": f"Bearer {api_key}"}
                jobs.append(call(client, listing_id, stream=stream, headers=auth, kind="prepaid", nonce=None))
        return list(await asyncio.gather(*jobs))


def check_the_books(
    onchain: OnChain,
    calls: list[Any],
    outcomes: list[Outcome],
    *,
    provider: str,
    earnings_before: int,
    payers: dict[str, tuple[int, int]],
    wallet: str,
    deposit_before: int,
    excess_before: int,
) -> None:
    by_id = {c.id: c for c in calls}
    # No call is left open: every reservation ended (the sweeper voided the ones the crash left).
    assert [c.id for c in calls if c.state in OPEN] == []
    assert {c.state for c in calls} <= set(FINAL_STATES) - {"failed", "refunded"}, {c.state for c in calls}
    # Every answered call was charged what it used, below its x402 authorization, and settled.
    served = [o for o in outcomes if o.served]
    assert served, "the load was not served at all"
    for outcome in served:
        assert outcome.call_id is not None
        charged = by_id[outcome.call_id]
        expected = cost(charged.completion_tokens)
        assert (charged.state, charged.amount) == ("settled", expected), (outcome, charged.state)
        assert expected < charged.reserved, charged
    # No refused or failed answer was charged.
    for outcome in outcomes:
        if outcome.status is not None and outcome.status != 200 and outcome.call_id is not None:
            assert by_id[outcome.call_id].state == "voided", outcome
    # The chain: each x402 payer paid the authorizations of its settled calls and holds the unused
    # rest in its escrow deposit, the provider earned exactly their share (so nothing was credited
    # twice), the escrow holds what it owes (and no more than before).
    settled = [c for c in calls if c.state == "settled"]
    for payer, (before, deposit) in payers.items():
        paid = [c for c in settled if c.gate == "x402" and c.payer == payer]
        assert before - onchain.balance(payer) == sum(c.reserved for c in paid), payer
        returned = onchain.deposit(payer) - deposit
        assert returned == sum(c.reserved - c.amount for c in paid), payer
    prepaid = sum(c.amount for c in settled if c.gate == "prepaid")
    assert deposit_before - int(onchain.escrow.functions.deposits(wallet).call()) == prepaid
    credited = sum(provider_share(c.amount) for c in settled)
    assert onchain.earnings(provider) - earnings_before == credited
    assert onchain.excess() == excess_before


async def test_relay_killed_mid_load_and_mid_settlement(
    onchain: OnChain, database_url: str, tmp_path: Any
) -> None:
    port = free_port()
    # The twin is shared: this test's relay and its `quotra reconcile` look at this test's blocks.
    env = relay_env(
        onchain, database_url, port, tmp_path / "data", QUOTRA_ESCROW_START_BLOCK=str(head(onchain))
    )
    relay = RelayProcess("relay", env, port, tmp_path)
    excess_before = onchain.excess()
    with relays(relay):
        relay.start()
        provider = Account.create()
        listing = await create_listing(
            relay.url,
            provider,
            models=["crash-model"],
            price_per_call="0.001",
            price_output_per_mtok=str(PER_TOKEN),
            max_output_tokens=MAX_TOKENS,
        )
        payers = [await X402Payer.funded(onchain, relay.url, listing["id"], 200 * PRICE) for _ in range(4)]
        wallet, api_key = await prepaid_key(onchain, relay.url, deposit=USDC, allowance=USDC)
        # (USDC balance, escrow deposit) of each x402 payer before the load.
        balances = {
            p.account.address: (onchain.balance(p.account.address), onchain.deposit(p.account.address))
            for p in payers
        }
        deposit_before = int(onchain.escrow.functions.deposits(wallet.address).call())

        # 1. Killed in the middle of the load.
        load = asyncio.create_task(mixed_load(relay.url, listing["id"], payers, api_key, 120, seed=1))
        started = random.randint(5, 30)  # killed after some calls were reserved, never at a fixed time

        async def under_way() -> bool:
            return len(await all_calls(database_url, [listing["id"]])) >= started

        await wait_until(under_way, 30, f"{started} calls reserved", poll=0.01)
        relay.kill()
        outcomes = await load
        assert any(o.status is None for o in outcomes), "the kill did not land mid-load"
        relay.start()

        # 2. Killed while a settlement transaction waits for its block.
        onchain.twin.rpc("evm_setAutomine", False)
        onchain.twin.rpc("evm_setIntervalMining", 2)
        try:
            outcomes += await mixed_load(relay.url, listing["id"], payers, api_key, 40, seed=2)

            async def in_flight() -> bool:
                batches = await all_batches(database_url)
                return any(b == "submitted" for b in batches)

            await wait_until(in_flight, 20, "a settlement batch submitted")
            relay.kill()
        finally:
            onchain.twin.rpc("evm_setIntervalMining", 0)
            onchain.twin.rpc("evm_setAutomine", True)
        relay.start()
        outcomes += await mixed_load(relay.url, listing["id"], payers, api_key, 20, seed=3)

        async def all_final() -> bool:
            calls = await all_calls(database_url, [listing["id"]])
            return all(c.state in FINAL_STATES for c in calls)

        await wait_until(all_final, 90, "every call settled or voided")
        calls = await all_calls(database_url, [listing["id"]])
        check_the_books(
            onchain,
            calls,
            outcomes,
            provider=provider.address,
            earnings_before=0,
            payers=balances,
            wallet=wallet.address,
            deposit_before=deposit_before,
            excess_before=excess_before,
        )
        reconcile = quotra_cli(env, "reconcile")
        assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr


async def test_two_replicas_serve_at_most_a_budget_and_take_over_settlement(
    onchain: OnChain, database_url: str, tmp_path: Any
) -> None:
    n = 5
    ports = free_port(), free_port()
    # Captured calls wait 3 s for their batch, so the leader dies with settlement still to do.
    start = str(head(onchain))
    envs = [
        relay_env(
            onchain,
            database_url,
            port,
            tmp_path / f"data{i}",
            QUOTRA_SETTLEMENT_MAX_AGE_SECONDS="3",
            QUOTRA_ESCROW_START_BLOCK=start,
        )
        for i, port in enumerate(ports)
    ]
    leader = RelayProcess("leader", envs[0], ports[0], tmp_path)
    follower = RelayProcess("follower", envs[1], ports[1], tmp_path)
    excess_before = onchain.excess()
    with relays(leader, follower):
        leader.start()  # first: it takes the settlement leadership
        await asyncio.sleep(1.0)
        follower.start()
        provider = Account.create()
        listing = await create_listing(leader.url, provider, models=["budget-model"], price_per_call="0.001")
        payer = await X402Payer.funded(onchain, leader.url, listing["id"], n * PRICE)
        wallets = [
            await prepaid_key(onchain, leader.url, deposit=n * PRICE, allowance=USDC),  # by deposit
            await prepaid_key(onchain, leader.url, deposit=USDC, allowance=n * PRICE),  # by permission
            await prepaid_key(onchain, leader.url, deposit=USDC, allowance=USDC, cap=n * PRICE),  # by cap
        ]
        before = onchain.balance(payer.account.address)
        deposits = [int(onchain.escrow.functions.deposits(w.address).call()) for w, _ in wallets]

        async def burst(headers: list[dict[str, str]], kind: str) -> list[Outcome]:
            async with (
                httpx.AsyncClient(base_url=leader.url, timeout=30) as a,
                httpx.AsyncClient(base_url=follower.url, timeout=30) as b,
            ):
                jobs = [
                    call((a, b)[i % 2], listing["id"], stream=i % 3 == 0, headers=h, kind=kind, nonce=None)
                    for i, h in enumerate(headers)
                ]
                return list(await asyncio.gather(*jobs))

        x402 = await burst([{"PAYMENT-SIGNATURE": payer.header()[0]} for _ in range(10 * n)], "x402")
        prepaid = [
            await burst([{"Authorization": f"Bearer {key}"}] * (10 * n), "prepaid") for _, key in wallets
        ]
        for outcomes in (x402, *prepaid):
            served = [o for o in outcomes if o.served]
            assert 1 <= len(served) <= n, [o.status for o in outcomes]
            assert all(o.status in (200, 402) for o in outcomes), [o.status for o in outcomes]
        leader.kill()  # the settlement leader dies with the batches not yet sent

        async def all_final() -> bool:
            calls = await all_calls(database_url, [listing["id"]])
            return all(c.state in FINAL_STATES for c in calls)

        await wait_until(all_final, 60, "the follower settling everything")
        calls = await all_calls(database_url, [listing["id"]])
        settled = [c for c in calls if c.state == "settled"]
        assert len(settled) == sum(o.served for outcomes in (x402, *prepaid) for o in outcomes)
        assert before - onchain.balance(payer.account.address) == PRICE * sum(o.served for o in x402)
        for (wallet, _), deposit, outcomes in zip(wallets, deposits, prepaid, strict=True):
            charged = deposit - int(onchain.escrow.functions.deposits(wallet.address).call())
            assert charged == PRICE * sum(o.served for o in outcomes)
        assert onchain.earnings(provider.address) == sum(provider_share(c.amount) for c in settled)
        assert onchain.excess() == excess_before
        reconcile = quotra_cli(envs[1], "reconcile")
        assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr


def head(onchain: OnChain) -> int:
    return int(onchain.chain.w3.eth.block_number) + 1


async def all_batches(database_url: str) -> list[str]:
    from quotra.store.models import SettlementBatch
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            return [str(s) for s in (await connection.execute(select(SettlementBatch.status))).scalars()]
    finally:
        await engine.dispose()
