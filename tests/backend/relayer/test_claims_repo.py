"""The claims store on SQLite and PostgreSQL: monotonic progress, a confirmed claim counted once,
durable webhook dedupe, revocations taking effect in the database at once, and a provider's
earnings per listing from its settled calls."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from quotra.calls.outbox import Outbox
from quotra.calls.records import X402Hold
from quotra.calls.store import CallStore, Hold, Served
from quotra.chain.relayer import Submission, TxState
from quotra.store.claims_repo import ClaimInFlight, ClaimsRepo, new_claim_id, new_revocation_id
from quotra.store.db import create_engine, upgrade
from quotra.store.models import ConsumerAccount, SpendPermissionRecord, utcnow
from quotra.store.prepaid_repo import PermissionView, PrepaidStore
from quotra.store.repositories import Store
from quotra.store.transactions import Transactions
from quotra.webhooks import RelayerEvent

PROVIDER = "0x1111111111111111111111111111111111111111"
CONSUMER = "0x2222222222222222222222222222222222222222"
DIGEST = "0x" + "aa" * 32
TX = "0x" + "bb" * 32


@pytest.fixture
async def repo(db_url: str) -> AsyncIterator[ClaimsRepo]:
    engine = create_engine(db_url)
    await upgrade(engine)
    try:
        yield ClaimsRepo(Store(engine))
    finally:
        await engine.dispose()


async def delegation(repo: ClaimsRepo, digest: str = DIGEST) -> None:
    await repo.save_delegation(
        digest=digest,
        provider=PROVIDER,
        delegate=PROVIDER,
        payee=PROVIDER,
        max_amount=2**256 - 1,  # uint256 caps fit
        relayer_fee=10_000,
        valid_until=2**40,
        salt=2**255,
        signature="0x" + "11" * 65,
    )


async def claim(repo: ClaimsRepo, task_id: str | None = "0xt1", digest: str = DIGEST) -> str:
    claim_id = new_claim_id()
    await repo.create_claim(
        claim_id=claim_id,
        provider=PROVIDER,
        payee=PROVIDER,
        delegation_digest=digest,
        amount=900_000,
        relayer_fee=10_000,
        relayer="oneshot",
        task_id=task_id,
    )
    return claim_id


async def revoke(repo: ClaimsRepo, account: str):
    revocation_id = new_revocation_id()
    return await repo.create_revocation(
        revocation_id=revocation_id, account=account, item=DIGEST, signature="0x", relayer="d", task_id=None
    )


async def test_progress_is_monotonic_and_confirmation_is_booked_once(repo: ClaimsRepo):
    await delegation(repo)
    claim_id = await claim(repo)
    assert await repo.advance(claim_id, Submission("0xt1", TxState.SUBMITTED, tx_hash=TX))
    assert await repo.advance(claim_id, Submission("0xt1", TxState.CONFIRMED, tx_hash=TX, block_number=7))
    assert not await repo.advance(claim_id, Submission("0xt1", TxState.CONFIRMED, tx_hash=TX))
    assert not await repo.advance(claim_id, Submission("0xt1", TxState.SUBMITTED, tx_hash=TX))
    assert not await repo.advance(claim_id, Submission("0xt1", TxState.REVERTED, error="late"))
    view = await repo.get_claim(claim_id)
    assert view is not None and (view.status, view.tx_hash, view.block_number) == ("confirmed", TX, 7)
    assert await repo.confirmed_total(PROVIDER) == 900_000  # confirmed twice, counted once
    delegation_view = await repo.get_delegation(DIGEST)
    assert delegation_view is not None and delegation_view.max_amount == 2**256 - 1


async def test_another_tasks_news__ignored(repo: ClaimsRepo):
    await delegation(repo)
    claim_id = await claim(repo)
    assert not await repo.advance(claim_id, Submission("0xother", TxState.CONFIRMED, tx_hash=TX))
    view = await repo.get_claim(claim_id)
    assert view is not None and view.status == "requested"


async def test_one_open_claim_per_delegation(repo: ClaimsRepo):
    await delegation(repo)
    first = await claim(repo)
    with pytest.raises(ClaimInFlight):
        await claim(repo)
    await repo.fail(first, "refused")
    await claim(repo)  # the first one is final: a new claim may go


async def test_webhook_events__deduplicated_on_id_and_type(repo: ClaimsRepo):
    await delegation(repo)
    claim_id = await claim(repo)
    data = {"id": "0xt1", "status": 110, "hash": TX, "memo": claim_id}
    event = RelayerEvent("0xt1", 4, data, 0, "oneshot")
    sub = Submission("0xt1", TxState.SUBMITTED, tx_hash=TX)
    assert await repo.record_event(event, sub) is True
    assert await repo.record_event(event, sub) is False
    confirmed = RelayerEvent("0xt1", 0, {**data, "status": 200}, 0, "oneshot")
    assert await repo.record_event(confirmed, Submission("0xt1", TxState.CONFIRMED, tx_hash=TX)) is True
    assert await repo.events_count() == 2
    view = await repo.get_claim(claim_id)
    assert view is not None and (view.status, view.tx_hash) == ("confirmed", TX)
    assert await repo.confirmed_total(PROVIDER) == 900_000


async def test_handlers_for_other_memos_run_inside_the_dedupe_transaction(repo: ClaimsRepo):
    seen: list[str] = []

    async def on_deposit(session, event: RelayerEvent) -> None:
        seen.append(event.memo or "")

    repo.register("dep_", on_deposit)
    event = RelayerEvent("0xt9", 0, {"id": "0xt9", "status": 200, "memo": "dep_1"}, 0, "oneshot")
    await repo.record_event(event, Submission("0xt9", TxState.CONFIRMED))
    await repo.record_event(event, Submission("0xt9", TxState.CONFIRMED))
    assert seen == ["dep_1"]


async def test_revoking_a_delegation__marks_it_and_fails_its_unsent_claims(repo: ClaimsRepo):
    await delegation(repo)
    unsent = await claim(repo, task_id=None)
    revocation = await repo.create_revocation(
        revocation_id=new_revocation_id(),
        account=PROVIDER,
        item=DIGEST,
        signature="0x",
        relayer="direct",
        task_id=None,
    )
    assert revocation.kind == "delegation"
    tracked = await repo.get_delegation(DIGEST)
    assert tracked is not None and tracked.revoked_at is not None
    view = await repo.get_claim(unsent)
    assert view is not None and (view.status, view.error) == ("failed", "delegation revoked")


async def test_revoking_a_permission__marks_it_and_clears_the_active_one(repo: ClaimsRepo):
    now = datetime.now(UTC)
    async with repo.sessions.begin() as session:
        session.add(
            SpendPermissionRecord(
                digest=DIGEST,
                consumer=CONSUMER,
                spender=PROVIDER,
                allowance=10**6,
                valid_after=0,
                valid_until=2**40,
                salt="0x01",
                signature="0x",
                created_at=now,
            )
        )
        session.add(ConsumerAccount(wallet=CONSUMER, permission_digest=DIGEST, created_at=now))
    revocation = await repo.create_revocation(
        revocation_id=new_revocation_id(),
        account=CONSUMER,
        item=DIGEST,
        signature="0x",
        relayer="direct",
        task_id=None,
    )
    assert revocation.kind == "permission"
    async with repo.sessions() as session:
        permission = await session.get(SpendPermissionRecord, DIGEST)
        account = await session.get(ConsumerAccount, CONSUMER)
    assert permission is not None and permission.revoked_at is not None
    assert account is not None and account.permission_digest is None


async def test_someone_elses_item__unknown_and_untouched(repo: ClaimsRepo):
    await delegation(repo)
    revocation = await repo.create_revocation(
        revocation_id=new_revocation_id(),
        account=CONSUMER,
        item=DIGEST,
        signature="0x",
        relayer="direct",
        task_id=None,
    )
    assert revocation.kind == "unknown"
    tracked = await repo.get_delegation(DIGEST)
    assert tracked is not None and tracked.revoked_at is None


async def test_listing_earnings__the_providers_share_of_its_settled_calls(repo: ClaimsRepo):
    """Per listing: amount minus the escrow's fee of every settled x402 and prepaid call; calls not
    settled (yet), refunded, free or metered (sandbox keys), and other providers' are not counted."""
    store = repo.store
    transactions = Transactions(store.engine)
    calls, outbox = CallStore(store.engine, transactions), Outbox(store.engine, transactions)
    other = "0x3333333333333333333333333333333333333333"
    for listing_id, owner in (("lst_a", PROVIDER), ("lst_b", PROVIDER), ("lst_c", other)):
        await store.create_listing(
            id=listing_id, owner=owner, kind="sandbox", base_url=None, models=["m"], api_key_sealed="s",
            price_per_call=1, price_input_per_mtok=None, price_output_per_mtok=None, max_calls=None,
            calls_used=0, max_input_chars=None, max_input_tokens=None, max_output_tokens=None,
            rate_per_minute=None, expires_at=None, status="active", failure_streak=0, cooldown_until=None,
        )  # fmt: skip
    served = Served("m", False, 1, 1, 1)
    deadline = utcnow() + timedelta(minutes=15)

    async def x402(listing_id: str, amount: int, provider: str = PROVIDER) -> str:
        hold = Hold(CONSUMER, listing_id, provider, amount, deadline)
        auth = X402Hold(
            CONSUMER, "0x" + secrets.token_hex(32), amount, 0, int(time.time()) + 300, "0x", "", 10**9, 1
        )
        call_id = await calls.reserve_x402(hold, auth)
        assert await calls.finish(call_id, amount=amount, usage=served)
        return call_id

    try:
        settled_a = await x402("lst_a", 1_000)
        reconciled_a = await x402("lst_a", 2_000)
        refunded_a = await x402("lst_a", 4_000)
        await x402("lst_a", 8_000)  # captured, not settled yet
        settled_b = await x402("lst_b", 3_000)
        elsewhere = await x402("lst_c", 5_000, other)
        assert await outbox.settle_x402(settled_a, tx_hash=TX, fee=100, block=1)
        assert await outbox.mark_reconciling(reconciled_a, "front-run", block=1)
        assert await outbox.settle_x402(reconciled_a, tx_hash=TX, fee=200, block=2, reconciled=True)
        assert await outbox.settle_x402(refunded_a, tx_hash=TX, fee=400, block=1)
        assert await outbox.refund_x402(refunded_a)
        assert await outbox.settle_x402(settled_b, tx_hash=TX, fee=300, block=1)
        assert await outbox.settle_x402(elsewhere, tx_hash=TX, fee=500, block=1)
        # A prepaid call, settled in a charges batch with the escrow's fee.
        prepaid = PrepaidStore(store, transactions)
        now = int(time.time())
        await prepaid.activate_permission(
            PermissionView(DIGEST, CONSUMER, PROVIDER, 10**6, now - 60, now + 86_400, "0x01", "0x", None), 0
        )
        seen = await prepaid.get_account(CONSUMER)
        assert seen is not None
        await prepaid.sync_account(
            CONSUMER, seen=seen, deposit=10**6, pending_withdrawal=0, permission_spent=0
        )
        await prepaid.create_key(
            key_id="key_1", secret_hash="h1", wallet=CONSUMER, name="", mode="live", spend_cap=None
        )
        await prepaid.create_key(
            key_id="key_2", secret_hash="h2", wallet=CONSUMER, name="", mode="sandbox", spend_cap=None
        )
        for key_id, live, amount in (("key_1", True, 600), ("key_2", False, 700)):
            call_id, _ = await calls.reserve_key(
                Hold(CONSUMER, "lst_b", PROVIDER, 1_000, deadline),
                key_id=key_id,
                live=live,
                now_ts=now,
                margin=600,
            )
            assert await calls.finish(call_id, amount=amount, usage=served)
        batch = await outbox.claim_charge_batch(DIGEST, 10)
        assert batch is not None and batch.amount == 600
        assert await outbox.settle_charges(batch, tx_hash=TX, gas_used=1, fee_bps=1_000, total_fee=60)
        free = await calls.reserve_playground(
            Hold("ip:1.2.3.4", "lst_a", PROVIDER, 0, deadline), free_calls=3, daily_default=100
        )
        assert await calls.finish(free, amount=999, usage=served)

        assert await repo.listing_earnings(PROVIDER) == {
            "lst_a": (1_000 - 100) + (2_000 - 200),
            "lst_b": (3_000 - 300) + (600 - 60),
        }
        assert await repo.listing_earnings(other) == {"lst_c": 5_000 - 500}
        assert await repo.listing_earnings("0x" + "44" * 20) == {}
    finally:
        await transactions.close()


async def test_next_check_is_the_earliest_open_claim_or_revocation(repo: ClaimsRepo):
    assert await repo.next_check() is None  # nothing open: the poller may sleep long
    await delegation(repo)
    claim_id = await claim(repo)  # never scheduled: due at once (its creation time)
    created = (await repo.get_claim(claim_id)).created_at  # type: ignore[union-attr]
    assert await repo.next_check() == created
    later = utcnow() + timedelta(seconds=300)
    await repo.reschedule(claim_id, attempts=1, next_check_at=later)
    assert await repo.next_check() == later
    revocation = await revoke(repo, PROVIDER)
    sooner = utcnow() + timedelta(seconds=60)
    await repo.reschedule(revocation.id, attempts=0, next_check_at=sooner)
    assert await repo.next_check() == sooner
    await repo.advance(revocation.id, Submission("", TxState.CONFIRMED))  # no longer open
    assert await repo.next_check() == later
    await repo.advance(claim_id, Submission("0xt1", TxState.CONFIRMED, tx_hash=TX))
    assert await repo.next_check() is None


async def test_the_claims_poller_sleeps_until_a_claim_is_due_or_opened(repo: ClaimsRepo):
    """An idle relay's poller looks once a `poll_seconds`; an open claim is checked when due, and
    one opened here wakes the poller to schedule it."""
    import asyncio

    from quotra.payments.claims import ClaimService

    service = ClaimService(repo, escrow=None, relayer=None, poll_seconds=30.0)  # type: ignore[arg-type]
    rounds: list[float] = []

    async def poll_once() -> int:  # what the poller finds due is rescheduled, as the real round does
        rounds.append(time.monotonic())
        for row in await repo.due_claims(utcnow()):
            await repo.reschedule(
                row.id, attempts=row.attempts + 1, next_check_at=utcnow() + timedelta(hours=1)
            )
        return 0

    service.poll_once = poll_once  # type: ignore[method-assign]
    stop = asyncio.Event()
    poller = asyncio.create_task(service.run(stop))
    await asyncio.sleep(0.5)
    assert len(rounds) == 1  # nothing open: no second look within poll_seconds
    await delegation(repo)
    claim_id = new_claim_id()
    await repo.create_claim(
        claim_id=claim_id, provider=PROVIDER, payee=PROVIDER, delegation_digest=DIGEST, amount=1,
        relayer_fee=0, relayer="d", task_id=None, next_check_at=utcnow() + timedelta(seconds=0.6),
    )  # fmt: skip
    service._opened.set()  # what opening a claim through the service does
    await asyncio.sleep(0.3)
    assert len(rounds) == 2  # woken to schedule it; not yet due
    await asyncio.sleep(0.8)
    assert len(rounds) == 3  # checked when due, then rescheduled an hour on
    assert 0.4 < rounds[2] - rounds[1] < 1.0
    stop.set()
    await asyncio.wait_for(poller, 2)
