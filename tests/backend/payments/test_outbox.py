"""The settlement outbox (`quotra.calls.outbox`) and the x402 side of the call store, on SQLite and
(through tools/with-postgres.sh) PostgreSQL: atomic x402 reservations against a balance snapshot
per block, once-only transitions whoever races for them, captured calls taken into batches by
concurrent claimers (SKIP LOCKED on PostgreSQL), charges settled with their fees, the books the
indexer audits, and one settlement leader."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from eth_account import Account
from quotra.calls.outbox import Outbox
from quotra.calls.records import FRONT_RUN, CallView, Refused, X402Hold, summary
from quotra.calls.store import CallStore, Hold, Served
from quotra.money import allocate_fees, split_fee
from quotra.payments.settlement import LeaderLock, payment_args
from quotra.store.apps_repo import AppsStore
from quotra.store.db import create_engine, upgrade
from quotra.store.models import X402Authorization, X402Payer, utcnow
from quotra.store.prepaid_repo import KeyRef, PermissionView, PrepaidStore, hash_key
from quotra.store.repositories import Store
from quotra.store.transactions import Transactions
from sqlalchemy import select

PROVIDER = Account.create().address
OTHER_PROVIDER = Account.create().address
LISTING = "lst_1"
SIGNATURE = "0x" + "11" * 65
TX = "0x" + "ab" * 32


@dataclass
class Books:
    store: Store
    calls: CallStore
    outbox: Outbox
    prepaid: PrepaidStore


@pytest.fixture
async def books(db_url: str) -> AsyncIterator[Books]:
    engine = create_engine(db_url)
    await upgrade(engine)
    transactions = Transactions(engine)
    store = Store(engine)
    await store.create_listing(
        id=LISTING, owner=PROVIDER, kind="sandbox", base_url=None, models=["m"], api_key_sealed="sealed",
        price_per_call=100, price_input_per_mtok=None, price_output_per_mtok=None, max_calls=None,
        calls_used=0, max_input_chars=None, max_input_tokens=None, max_output_tokens=None,
        rate_per_minute=None, expires_at=None, status="active", failure_streak=0, cooldown_until=None,
    )  # fmt: skip
    try:
        calls, outbox = CallStore(engine, transactions), Outbox(engine, transactions)
        yield Books(store, calls, outbox, PrepaidStore(store, transactions))
    finally:
        await transactions.close()
        await engine.dispose()


SERVED = Served("m", False, 3, 4, 10)


async def reserve(
    books: Books,
    payer: str,
    *,
    nonce: str | None = None,
    amount: int = 100,
    balance: int = 10**9,
    block: int = 1,
    valid_before: int | None = None,
    provider: str = PROVIDER,
) -> str:
    hold = Hold(payer, LISTING, provider, amount, utcnow() + timedelta(minutes=15))
    auth = X402Hold(
        payer=payer,
        nonce=nonce or "0x" + secrets.token_hex(32),
        value=amount,
        valid_after=0,
        valid_before=valid_before or int(time.time()) + 300,
        signature=SIGNATURE,
        request_hash="cd" * 32,
        balance=balance,
        block=block,
    )
    return await books.calls.reserve_x402(hold, auth)


async def captured(books: Books, payer: str | None = None, **kwargs: Any) -> str:
    call_id = await reserve(books, payer or Account.create().address, **kwargs)
    assert await books.calls.finish(call_id, amount=kwargs.get("amount", 100), usage=SERVED)
    return call_id


async def state(books: Books, call_id: str) -> str:
    call = await books.calls.get(call_id)
    assert call is not None
    return call.state


async def authorization(books: Books, call_id: str) -> Any:
    async with books.store.engine.connect() as connection:
        return (
            await connection.execute(select(X402Authorization).where(X402Authorization.call_id == call_id))
        ).one()


async def pending_value(books: Books, payer: str) -> int:
    query = select(X402Authorization.value).where(X402Authorization.payer == payer, X402Authorization.pending)
    async with books.store.engine.connect() as connection:
        return sum(v for (v,) in await connection.execute(query))


async def outcomes(work: list[Any]) -> list[str]:
    """ "ok" for each reservation made, the reason of each refused."""
    got = []
    for result in await asyncio.gather(*work, return_exceptions=True):
        if isinstance(result, BaseException) and not isinstance(result, Refused):
            raise result
        got.append(result.reason if isinstance(result, Refused) else "ok")
    return sorted(got)


# ---- x402 reservations ------------------------------------------------------------------------


async def test_reservations_never_exceed_the_balance_under_concurrency(books: Books) -> None:
    payer = Account.create().address
    got = await outcomes([reserve(books, payer, amount=100, balance=1_000) for _ in range(20)])
    assert got == ["insufficient_balance"] * 10 + ["ok"] * 10
    assert await pending_value(books, payer) == 1_000
    listing = await books.store.get_listing(LISTING)
    assert listing is not None and listing.calls_used == 10  # the refused ones took nothing


async def test_one_nonce_is_reserved_once_under_concurrency(books: Books) -> None:
    payer = Account.create().address
    nonce = "0x" + secrets.token_hex(32)
    results = await asyncio.gather(
        *(reserve(books, payer, nonce=nonce) for _ in range(20)), return_exceptions=True
    )
    (winner,) = [r for r in results if isinstance(r, str)]
    refusals = [r for r in results if isinstance(r, Refused)]
    assert len(refusals) == 19 and {r.reason for r in refusals} == {"nonce_used"}
    assert {r.call.id for r in refusals if r.call is not None} == {winner}
    assert all(r.call is not None for r in refusals)  # each told which call the payment is for
    found = await books.calls.by_authorization(payer, nonce)
    assert found is not None and found.id == winner


async def test_insufficient_funds_leaves_nothing_behind(books: Books) -> None:
    payer = Account.create().address
    with pytest.raises(Refused) as refused:
        await reserve(books, payer, amount=11, balance=10)
    assert refused.value.reason == "insufficient_balance" and refused.value.call is None
    assert await books.outbox.x402_in(["reserved"]) == []
    assert await books.calls.of_payer((payer,), limit=10) == []
    async with books.store.engine.connect() as connection:
        assert (await connection.execute(select(X402Payer))).all() == []  # not even the snapshot
    listing = await books.store.get_listing(LISTING)
    assert listing is not None and listing.calls_used == 0


async def test_the_balance_snapshot_per_block(books: Books) -> None:
    """A reservation is checked against the newest known balance (as of its block) minus every
    authorization not settled in or before that block."""
    payer = Account.create().address
    first = await reserve(books, payer, amount=600, balance=1_000, block=10)
    assert await books.calls.finish(first, amount=600, usage=SERVED)
    with pytest.raises(Refused, match="insufficient_balance"):
        await reserve(books, payer, amount=600, balance=1_000, block=10)
    # Settled at block 12: a balance of block 11 does not show it yet, so it still counts.
    assert await books.outbox.settle_x402(first, tx_hash=TX, fee=60, block=12)
    assert (await authorization(books, first)).settled_block == 12
    with pytest.raises(Refused, match="insufficient_balance"):
        await reserve(books, payer, amount=600, balance=1_000, block=11)
    # The balance of block 12 shows it (1_000 - 600): it no longer counts, once.
    with pytest.raises(Refused, match="insufficient_balance"):
        await reserve(books, payer, amount=600, balance=400, block=12)
    second = await reserve(books, payer, amount=400, balance=400, block=12)
    assert (await authorization(books, first)).pending is False
    assert (await authorization(books, second)).pending is True
    # An older snapshot (a lagging node) never replaces a newer one.
    with pytest.raises(Refused, match="insufficient_balance"):
        await reserve(books, payer, amount=1, balance=10**9, block=9)
    async with books.store.engine.connect() as connection:
        snapshot = (await connection.execute(select(X402Payer.balance, X402Payer.block))).one()
    assert tuple(snapshot) == (400, 12)


async def test_finish_and_void_apply_once(books: Books) -> None:
    payer = Account.create().address
    kept, voided = await reserve(books, payer), await reserve(books, payer)
    assert await books.calls.finish(kept, amount=100, usage=SERVED)
    assert not await books.calls.finish(kept, amount=100, usage=SERVED)
    assert not await books.calls.void(kept, outcome="error")
    assert await books.calls.void(voided, outcome="upstream_error")
    assert not await books.calls.finish(voided, amount=100, usage=SERVED)
    assert (await state(books, kept), await state(books, voided)) == ("captured", "voided")
    assert (await authorization(books, kept)).pending is True
    assert (await authorization(books, voided)).pending is False
    assert await pending_value(books, payer) == 100  # the voided one no longer counts
    # A captured authorization never pays again; a voided one (nothing charged) may, once.
    with pytest.raises(Refused) as refused:
        await reserve(books, payer, nonce=(await authorization(books, kept)).nonce)
    assert refused.value.reason == "nonce_used" and refused.value.call is not None
    assert refused.value.call.id == kept
    nonce = (await authorization(books, voided)).nonce
    again = await reserve(books, payer, nonce=nonce)
    assert again not in (kept, voided) and await state(books, voided) == "voided"
    assert (await authorization(books, again)).pending is True
    found = await books.outbox.find_x402_many([(payer, nonce.upper().replace("0X", "0x"))])
    assert {k: (f.call_id, f.state) for k, f in found.items()} == {
        (payer, nonce.lower()): (again, "reserved")
    }
    with pytest.raises(Refused) as refused:
        await reserve(books, payer, nonce=nonce)
    assert refused.value.call is not None and refused.value.call.id == again


# ---- x402 outcomes ----------------------------------------------------------------------------


async def test_settle_is_recorded_once_when_raced(books: Books) -> None:
    payment = await captured(books, amount=1_000)
    results = await asyncio.gather(
        *(books.outbox.settle_x402(payment, tx_hash=TX, fee=100, block=7) for _ in range(5))
    )
    assert sorted(results) == [False] * 4 + [True]
    row = await books.outbox.get_x402(payment)
    assert row is not None and (row.state, row.tx_hash, row.amount) == ("settled", TX, 1_000)
    call = await books.calls.get(payment)
    assert call is not None and (call.fee, call.charged) == (100, True)
    assert (await authorization(books, payment)).settled_block == 7
    assert await books.outbox.refund_x402(payment)
    assert not await books.outbox.refund_x402(payment)
    assert not await books.outbox.settle_x402(payment, tx_hash=TX, fee=100, block=8)
    refunded = await books.outbox.get_x402(payment)
    assert refunded is not None and (refunded.state, refunded.tx_hash) == ("refunded", TX)  # what credited it


async def test_a_per_token_call_settles_its_charge_and_the_authorized_value(books: Books) -> None:
    # Authorized 20_300 (the listing's maximum), charged 10_400: the batch sends both to the
    # escrow, which credits the rest to the payer's deposit; the call says what goes back.
    payer = Account.create().address
    call_id = await reserve(books, payer, amount=20_300)
    assert await books.calls.finish(call_id, amount=10_400, usage=SERVED)
    batch = await books.outbox.claim_x402_batch(64, int(time.time()), 10)
    assert batch is not None and batch.amount == 10_400  # what the escrow's PaymentsSettled says
    (row,) = await books.outbox.batch_x402(batch.id)
    args = payment_args(dataclasses.replace(row, signature="0x" + "11" * 64 + "1b"))
    assert (row.value, row.amount, args.amount, args.charged) == (20_300, 10_400, 20_300, 10_400)
    assert await books.outbox.settle_x402(call_id, tx_hash=TX, fee=1_040, block=9)
    call = await books.calls.get(call_id)
    assert call is not None and (call.reserved, call.amount, call.returned) == (20_300, 10_400, 9_900)
    assert summary(call)["returned_to_deposit_atomic"] == 9_900


async def test_a_reconciled_call_returns_nothing_to_the_deposit(books: Books) -> None:
    # The escrow credits a front-run payment's charge only (paid by the operator).
    call_id = await reserve(books, Account.create().address, amount=20_300)
    assert await books.calls.finish(call_id, amount=10_400, usage=SERVED)
    assert await books.outbox.mark_reconciling(call_id, FRONT_RUN, block=7)
    assert await books.outbox.settle_x402(call_id, tx_hash=TX, fee=1_040, block=20, reconciled=True)
    call = await books.calls.get(call_id)
    assert call is not None and (call.state, call.amount, call.error, call.returned) == (
        "settled",
        10_400,
        FRONT_RUN,
        0,
    )


async def test_a_call_that_cost_nothing_leaves_its_authorization_unused(books: Books) -> None:
    payer = Account.create().address
    call_id = await reserve(books, payer, amount=20_300)
    assert await books.calls.finish(call_id, amount=0, usage=SERVED)
    call = await books.calls.get(call_id)
    assert call is not None and (call.state, call.charged, call.returned) == ("settled", False, 0)
    assert (await authorization(books, call_id)).pending is False
    assert await pending_value(books, payer) == 0  # no longer counted against the payer
    assert await books.outbox.claim_x402_batch(64, int(time.time()), 10) is None  # nothing to send


async def test_a_front_run_is_reconciled_once(books: Books) -> None:
    payer = Account.create().address
    payment = await captured(books, payer)
    assert await books.outbox.mark_reconciling(payment, "front-run", block=7)
    assert not await books.outbox.mark_reconciling(payment, "front-run", block=8)
    row = await books.outbox.get_x402(payment)
    assert row is not None and (row.state, row.error) == ("reconciling", "front-run")
    assert (await authorization(books, payment)).settled_block == 7  # the payer's USDC left then
    assert [r.call_id for r in await books.outbox.x402_in(["reconciling"])] == [payment]
    assert await books.outbox.settle_x402(payment, tx_hash=TX, fee=10, block=20, reconciled=True)
    assert (await authorization(books, payment)).settled_block == 7  # not the operator's block
    assert await state(books, payment) == "settled"
    # Used outside the escrow (or cancelled by its payer): the payer takes no more x402 calls.
    with pytest.raises(Refused) as refused:
        await reserve(books, payer)
    assert refused.value.reason == "payer_unpaid"


async def test_a_payment_that_cannot_settle_is_failed_once(books: Books) -> None:
    payer = Account.create().address
    payment = await captured(books, payer)
    assert await books.outbox.fail_x402(payment, "USDC refused the authorization", payer_fault=True)
    assert not await books.outbox.fail_x402(payment, "again", payer_fault=True)
    assert not await books.outbox.settle_x402(payment, tx_hash=TX, fee=10, block=3)
    call = await books.calls.get(payment)
    assert call is not None and (call.state, call.charged, call.error) == (
        "failed",
        False,
        "USDC refused the authorization",
    )
    assert await pending_value(books, payer) == 0  # no money moved: no longer held
    assert await books.outbox.calls_in(["failed"], ["x402", "prepaid"]) == [
        (payment, "failed", "USDC refused the authorization")
    ]
    # Its payer let it go unpaid: refused from now on, whatever its balance.
    with pytest.raises(Refused) as refused:
        await reserve(books, payer)
    assert refused.value.reason == "payer_unpaid"


async def test_a_payment_the_relay_let_expire_does_not_count_against_its_payer(books: Books) -> None:
    payer = Account.create().address
    payment = await captured(books, payer)
    assert await books.outbox.fail_x402(payment, "expired before settlement", payer_fault=False)
    assert await state(books, payment) == "failed"
    assert await state(books, await reserve(books, payer)) == "reserved"


# ---- x402 batches -----------------------------------------------------------------------------


async def test_concurrent_claimers_take_disjoint_rows(books: Books) -> None:
    payer = Account.create().address
    ids = [await captured(books, payer) for _ in range(12)]
    count, oldest, expiry = await books.outbox.x402_backlog()
    assert count == 12 and oldest is not None and expiry is not None
    batches = await asyncio.gather(
        *(books.outbox.claim_x402_batch(5, int(time.time()), 10) for _ in range(4))
    )
    taken = [await books.outbox.batch_x402(b.id) for b in batches if b is not None]
    claimed = [row.call_id for rows in taken for row in rows]
    assert sorted(claimed) == sorted(ids) and len(set(claimed)) == len(claimed)
    assert all(len(rows) <= 5 for rows in taken)
    assert sum(b.amount for b in batches if b is not None) == 12 * 100
    assert all(b.items == len(rows) for b, rows in zip([b for b in batches if b], taken, strict=True))
    assert {row.state for rows in taken for row in rows} == {"settling"}
    assert (await books.outbox.x402_backlog())[0] == 0
    assert await books.outbox.claim_x402_batch(5, int(time.time()), 10) is None


async def test_expiring_authorizations_are_failed_not_batched(books: Books) -> None:
    payer = Account.create().address
    payment = await captured(books, payer, amount=5, balance=10, valid_before=int(time.time()) + 3)
    assert await books.outbox.claim_x402_batch(10, int(time.time()), 10) is None
    row = await books.outbox.get_x402(payment)
    assert row is not None and (row.state, row.error) == ("failed", "expired before settlement")
    assert await pending_value(books, payer) == 0


async def test_a_released_call_is_taken_by_the_next_batch(books: Books) -> None:
    payment = await captured(books)
    first = await books.outbox.claim_x402_batch(5, int(time.time()), 10)
    assert first is not None
    assert await books.outbox.release_x402(payment, f"not in {TX}")
    assert not await books.outbox.release_x402(payment, "again")
    row = await books.outbox.get_x402(payment)
    assert row is not None and (row.state, row.batch_id) == ("captured", None)
    second = await books.outbox.claim_x402_batch(5, int(time.time()), 10)
    assert second is not None and second.id != first.id
    assert [r.call_id for r in await books.outbox.batch_x402(second.id)] == [payment]
    assert await books.outbox.batch_x402(first.id) == []


async def test_a_failed_batch_fails_its_calls(books: Books) -> None:
    payer = Account.create().address
    payments = [await captured(books, payer) for _ in range(2)]
    batch = await books.outbox.claim_x402_batch(5, int(time.time()), 10)
    assert batch is not None
    assert await books.outbox.start_attempt(batch.id)
    assert await books.outbox.mark_submitted(batch.id, "sub-1", TX)
    assert not await books.outbox.mark_submitted(batch.id, "sub-2", TX)  # only from pending
    await books.outbox.fail_batch(batch.id, "reverted three times")
    failed = await books.outbox.get_batch(batch.id)
    assert failed is not None and (failed.status, failed.error, failed.attempts) == (
        "failed",
        "reverted three times",
        1,
    )
    assert [await state(books, p) for p in payments] == ["failed", "failed"]
    assert await pending_value(books, payer) == 0
    assert [b.id for b in await books.outbox.batches(["failed"])] == [batch.id]
    assert not await books.outbox.close_batch(batch.id, "confirmed")  # final already


# ---- prepaid charges --------------------------------------------------------------------------


async def consumer(books: Books, deposit: int = 10**6) -> tuple[KeyRef, str]:
    """A wallet with a deposit, an active permission and a live key; its permission's digest."""
    wallet = Account.create().address
    digest = "0x" + hash_key(wallet)
    now = int(time.time())
    await books.prepaid.activate_permission(
        PermissionView(digest, wallet, PROVIDER, 10**6, now - 60, now + 86_400, "0x01", "0x", None), 0
    )
    seen = await books.prepaid.get_account(wallet)
    assert seen is not None
    await books.prepaid.sync_account(
        wallet, seen=seen, deposit=deposit, pending_withdrawal=0, permission_spent=0
    )
    key_id = "key_" + hash_key(wallet)[:16]
    await books.prepaid.create_key(
        key_id=key_id, secret_hash=hash_key(key_id), wallet=wallet, name="", mode="live", spend_cap=None
    )
    return KeyRef(key_id, wallet, "live"), digest


async def charge(books: Books, key: KeyRef, amount: int, provider: str = PROVIDER) -> str:
    hold = Hold(key.wallet, LISTING, provider, amount + 50, utcnow() + timedelta(minutes=15))
    call_id, _ = await books.calls.reserve_key(
        hold, key_id=key.id, live=True, now_ts=int(time.time()), margin=600
    )
    assert await books.calls.finish(call_id, amount=amount, usage=SERVED)
    return call_id


async def test_charges_are_batched_per_permission_each_call_once(books: Books) -> None:
    key, digest = await consumer(books)
    other, other_digest = await consumer(books)
    mine = [await charge(books, key, 10) for _ in range(3)]
    theirs = await charge(books, other, 20)
    assert sorted(d for d, _ in await books.outbox.charge_backlog()) == sorted([digest, other_digest])
    first = await books.outbox.claim_charge_batch(digest, 2)
    assert first is not None and (first.kind, first.permission_digest, first.items, first.amount) == (
        "charges",
        digest,
        2,
        20,
    )
    # Another batch of the same permission may be in flight (each settles under its own
    # reference); it takes what the first did not.
    second = await books.outbox.claim_charge_batch(digest, 256)
    assert second is not None and (second.items, second.amount) == (1, 10)
    assert first.reference != second.reference
    in_first = [c.call_id for c in await books.outbox.batch_charges(first.id)]
    in_second = [c.call_id for c in await books.outbox.batch_charges(second.id)]
    assert sorted(in_first + in_second) == sorted(mine) and not set(in_first) & set(in_second)
    assert await books.outbox.claim_charge_batch(digest, 256) is None
    assert [d for d, _ in await books.outbox.charge_backlog()] == [other_digest]
    assert await state(books, theirs) == "captured"


async def test_charges_settle_with_the_escrows_fees_and_move_the_account(books: Books) -> None:
    key, digest = await consumer(books, deposit=10_000)
    amounts = [(1_235, PROVIDER), (1_001, OTHER_PROVIDER), (1_235, PROVIDER)]
    ids = [await charge(books, key, amount, provider) for amount, provider in amounts]
    before = await books.prepaid.get_account(key.wallet)
    assert before is not None and before.unsettled == 3_471
    batch = await books.outbox.claim_charge_batch(digest, 256)
    assert batch is not None and batch.amount == 3_471
    # The escrow fees each provider's sum at once: 247 of 2_470 and 100 of 1_001.
    total_fee = split_fee(2_470, 1_000) + split_fee(1_001, 1_000)
    assert await books.outbox.settle_charges(
        batch, tx_hash=TX, gas_used=80_000, fee_bps=1_000, total_fee=total_fee
    )
    assert not await books.outbox.settle_charges(
        batch, tx_hash=TX, gas_used=80_000, fee_bps=1_000, total_fee=1
    )
    calls = [await books.calls.get(i) for i in ids]
    assert all(c is not None and (c.state, c.tx_hash) == ("settled", TX) for c in calls)
    fees = {c.id: c.fee for c in calls if c is not None}
    assert sorted([fees[ids[0]], fees[ids[2]]]) == allocate_fees([1_235, 1_235], 247, 1_000) == [123, 124]
    assert fees[ids[1]] == 100 and sum(fees.values()) == total_fee  # type: ignore[arg-type]
    after = await books.prepaid.get_account(key.wallet)
    assert after is not None
    assert (after.unsettled, after.deposit, after.permission_spent) == (0, 10_000 - 3_471, 3_471)
    settled = await books.outbox.get_batch(batch.id)
    assert settled is not None and (settled.status, settled.tx_hash, settled.gas_used) == (
        "confirmed",
        TX,
        80_000,
    )
    assert await books.outbox.batch_by_reference(batch.reference.upper().replace("0X", "0x")) == settled
    assert await books.prepaid.settled_total(key.wallet) == 3_471
    books_by_provider = await books.outbox.credited_by_provider()
    assert books_by_provider == {PROVIDER: (2_470, 247), OTHER_PROVIDER: (1_001, 100)}


async def test_charges_under_a_connected_permission_move_its_budget_not_the_accounts(books: Books) -> None:
    """A wallet that pays for an app (its permission for the app, not its own active one): the
    batch moves that permission's budget from unsettled to spent, and the account's deposit, but
    not the account's mirror of its own permission."""
    key, own = await consumer(books, deposit=10_000)
    apps, developer = AppsStore(books.store), Account.create().address
    app = await apps.create_app(app_id="app_" + "c" * 16, owner=developer, name="c", markup_bps=0)
    now = int(time.time())
    digest = "0x" + hash_key(developer)
    permission = PermissionView(
        digest, key.wallet, PROVIDER, 5_000, now - 60, now + 86_400, "0x02", "0x", None, developer
    )
    await apps.connect_wallet(app.id, "u", permission, 100)
    await books.prepaid.create_key(
        key_id="key_app", secret_hash=hash_key("key_app"), wallet=developer, name="", mode="live",
        spend_cap=None, app_id=app.id,
    )  # fmt: skip
    hold = Hold(
        developer, LISTING, PROVIDER, 1_000, utcnow() + timedelta(minutes=15), app_id=app.id, end_user="u"
    )
    call_id, _ = await books.calls.reserve_key(hold, key_id="key_app", live=True, now_ts=now, margin=600)
    assert await books.calls.finish(call_id, amount=700, usage=SERVED)
    batch = await books.outbox.claim_charge_batch(digest, 256)
    assert batch is not None and batch.amount == 700

    assert await books.outbox.settle_charges(batch, tx_hash=TX, gas_used=80_000, fee_bps=1_000, total_fee=70)

    connected = await books.prepaid.get_permission(digest)
    assert connected is not None and (connected.spent, connected.unsettled, connected.reserved) == (800, 0, 0)
    after = await books.prepaid.get_account(key.wallet)
    assert after is not None
    assert (after.permission_digest, after.unsettled, after.deposit, after.permission_spent) == (
        own,
        0,
        9_300,
        0,
    )


async def test_a_failed_charges_batch_fails_its_calls(books: Books) -> None:
    key, digest = await consumer(books)
    call_id = await charge(books, key, 10)
    batch = await books.outbox.claim_charge_batch(digest, 256)
    assert batch is not None
    await books.outbox.fail_batch(batch.id, "the spend permission is not registered")
    call = await books.calls.get(call_id)
    assert call is not None and (call.state, call.error) == (
        "failed",
        "the spend permission is not registered",
    )


# ---- the books the indexer audits -------------------------------------------------------------


async def test_credited_by_provider_counts_what_stays_credited(books: Books) -> None:
    kept = await captured(books, amount=1_000)
    refunded = await captured(books, amount=500)
    unsettled = await captured(books, amount=300, provider=OTHER_PROVIDER)
    assert await books.outbox.settle_x402(kept, tx_hash=TX, fee=100, block=5)
    assert await books.outbox.settle_x402(refunded, tx_hash=TX, fee=50, block=5)
    assert await books.outbox.refund_x402(refunded)
    assert await books.outbox.credited_by_provider() == {PROVIDER: (1_000, 100)}
    assert await state(books, unsettled) == "captured"


async def test_reservations_past_their_deadline_are_stranded_until_swept(books: Books) -> None:
    payer = Account.create().address
    stuck = await reserve(books, payer)
    later = time.time() + 16 * 60
    assert [(c, s) for c, s, _ in await books.outbox.stranded(later)] == [(stuck, "reserved")]
    assert await books.outbox.stranded(time.time()) == []
    assert await books.calls.sweep(utcnow() + timedelta(minutes=16)) == 1
    assert await books.outbox.stranded(later) == []
    call = await books.calls.get(stuck)
    assert isinstance(call, CallView) and call.state == "voided"
    assert await pending_value(books, payer) == 0


async def test_the_indexer_cursor(books: Books) -> None:
    contract = Account.create().address
    assert await books.outbox.cursor(contract) is None
    await books.outbox.set_cursor(contract, 5)
    await books.outbox.set_cursor(contract, 9)
    assert await books.outbox.cursor(contract) == 9
    assert await books.outbox.cursor(Account.create().address) is None


# ---- the settlement leader --------------------------------------------------------------------


async def test_one_settlement_leader_per_database(books: Books) -> None:
    first, second = LeaderLock(books.store.engine), LeaderLock(books.store.engine)
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
