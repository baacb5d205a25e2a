"""The payments repository on SQLite and PostgreSQL: atomic reservations, once-only transitions,
outbox rows taken by concurrent claimers (SKIP LOCKED on PostgreSQL) and one settlement leader."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import pytest
from eth_account import Account
from quotra.payments.settlement import LeaderLock
from quotra.store.db import create_engine, upgrade
from quotra.store.models import PrepaidCharge, SettlementBatch
from quotra.store.payments_repo import InsufficientFunds, NonceAlreadyReserved, PaymentsRepo, allocate_fees
from quotra.store.repositories import Store

PROVIDER = Account.create().address
SIGNATURE = "0x" + "11" * 65


@pytest.fixture
async def repo(db_url: str) -> AsyncIterator[PaymentsRepo]:
    engine = create_engine(db_url)
    await upgrade(engine)
    try:
        yield PaymentsRepo(Store(engine))
    finally:
        await engine.dispose()


async def reserve(
    repo: PaymentsRepo, payer: str, *, nonce: str | None = None, amount: int = 100, balance: int = 10**9
) -> int:
    return await repo.reserve_x402(
        payer=payer,
        nonce=nonce or "0x" + secrets.token_hex(32),
        amount=amount,
        valid_after=0,
        valid_before=int(time.time()) + 300,
        signature=SIGNATURE,
        listing_id="lst_1",
        provider=PROVIDER,
        balance=balance,
    )


async def outcomes(calls: list) -> list[str]:
    results = await asyncio.gather(*calls, return_exceptions=True)
    return sorted("ok" if isinstance(r, int) else type(r).__name__ for r in results)


async def test_reservations_never_exceed_the_balance_under_concurrency(repo: PaymentsRepo) -> None:
    payer = Account.create().address
    got = await outcomes([reserve(repo, payer, amount=100, balance=1_000) for _ in range(20)])
    assert got.count("ok") == 10 and got.count("InsufficientFunds") == 10
    assert await repo.pending_x402(payer) == 1_000


async def test_one_nonce_is_reserved_once_under_concurrency(repo: PaymentsRepo) -> None:
    payer = Account.create().address
    nonce = "0x" + secrets.token_hex(32)
    got = await outcomes([reserve(repo, payer, nonce=nonce) for _ in range(20)])
    assert got == ["NonceAlreadyReserved"] * 19 + ["ok"]


async def test_capture_and_void_apply_once_with_their_ledger_entry(repo: PaymentsRepo) -> None:
    payer = Account.create().address
    captured, voided = await reserve(repo, payer), await reserve(repo, payer)
    assert await repo.capture_x402(captured) is not None
    assert await repo.capture_x402(captured) is None and await repo.void_x402(captured) is None
    assert await repo.void_x402(voided) is not None and await repo.capture_x402(voided) is None
    assert [k for k, *_ in await repo.ledger_for(f"x402_{captured}")] == ["capture"]
    assert [k for k, *_ in await repo.ledger_for(f"x402_{voided}")] == ["void"]
    assert await repo.pending_x402(payer) == 100  # the voided one no longer counts
    with pytest.raises(NonceAlreadyReserved):
        await reserve(repo, payer, nonce=(await repo.get_x402(voided)).nonce)  # type: ignore[union-attr]


async def test_settle_is_recorded_once_when_raced(repo: PaymentsRepo) -> None:
    payment = await reserve(repo, Account.create().address, amount=1_000)
    await repo.capture_x402(payment)
    results = await asyncio.gather(
        *(repo.settle_x402(payment, tx_hash="0x" + "ab" * 32, fee=100) for _ in range(5))
    )
    assert sorted(results) == [False] * 4 + [True]
    assert [k for k, *_ in await repo.ledger_for(f"x402_{payment}")] == ["capture", "settle"]


async def test_concurrent_claimers_take_disjoint_rows(repo: PaymentsRepo) -> None:
    payer = Account.create().address
    ids = [await reserve(repo, payer) for _ in range(12)]
    for payment in ids:
        await repo.capture_x402(payment)
    batches = await asyncio.gather(*(repo.claim_x402_batch(5, int(time.time()), 10) for _ in range(4)))
    taken = [await repo.batch_x402(b.id) for b in batches if b is not None]
    claimed = [row.id for rows in taken for row in rows]
    assert sorted(claimed) == sorted(ids) and len(set(claimed)) == len(claimed)
    assert sum(b.amount for b in batches if b is not None) == 12 * 100


async def test_expiring_authorizations_are_failed_not_batched(repo: PaymentsRepo) -> None:
    payer = Account.create().address
    payment = await repo.reserve_x402(
        payer=payer, nonce="0x" + secrets.token_hex(32), amount=5, valid_after=0,
        valid_before=int(time.time()) + 3, signature=SIGNATURE, listing_id="l", provider=PROVIDER, balance=10,
    )  # fmt: skip
    await repo.capture_x402(payment)
    assert await repo.claim_x402_batch(10, int(time.time()), 10) is None
    assert (await repo.get_x402(payment)).status == "failed"  # type: ignore[union-attr]


async def test_a_permission_with_a_batch_in_flight_is_not_batched_again(repo: PaymentsRepo) -> None:
    digest = "0x" + "cd" * 32
    async with repo.sessions.begin() as session:
        for _ in range(2):
            session.add(
                PrepaidCharge(
                    consumer=PROVIDER, api_key_id="k", permission_digest=digest, listing_id="l",
                    provider=PROVIDER, reserved_amount=10, amount=10, status="captured",
                )
            )  # fmt: skip
    (backlog,) = await repo.charge_backlog()
    assert backlog[0] == digest
    batch = await repo.claim_charge_batch(digest, 1)
    assert batch is not None and batch.items == 1
    assert await repo.charge_backlog() == []  # one batch per permission in flight
    async with repo.sessions.begin() as session:
        (await session.get(SettlementBatch, batch.id)).status = "confirmed"  # type: ignore[union-attr]
    assert [d for d, _ in await repo.charge_backlog()] == [digest]


async def test_one_settlement_leader_per_database(repo: PaymentsRepo) -> None:
    first, second = LeaderLock(repo.store.engine), LeaderLock(repo.store.engine)
    assert await first.acquire()
    assert not await second.acquire()
    assert await first.check()
    await first.release()
    assert await second.acquire()
    await second.release()


def test_fees_of_calls_settled_as_one_sum_add_up_to_the_escrows() -> None:
    amounts = [1_234, 1_234, 1_234]
    total_fee = sum(amounts) * 1_000 // 10_000
    fees = allocate_fees(amounts, total_fee, 1_000)
    assert sum(fees) == total_fee and fees[:2] == [123, 123]


async def test_insufficient_funds_leaves_nothing_behind(repo: PaymentsRepo) -> None:
    payer = Account.create().address
    with pytest.raises(InsufficientFunds):
        await reserve(repo, payer, amount=11, balance=10)
    assert await repo.x402_with_status(["reserved"]) == []
