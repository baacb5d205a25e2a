"""The claims store on SQLite and PostgreSQL: monotonic progress, one ledger entry per confirmed
claim, durable webhook dedupe, and revocations taking effect in the database at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from quotra.chain.relayer import Submission, TxState
from quotra.store.claims_repo import ClaimInFlight, ClaimsRepo, new_claim_id, new_revocation_id
from quotra.store.db import create_engine, upgrade
from quotra.store.models import ConsumerAccount, LedgerEntry, SpendPermissionRecord
from quotra.store.repositories import Store
from quotra.webhooks import RelayerEvent
from sqlalchemy import func, select

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


async def ledger_claims(repo: ClaimsRepo) -> int:
    async with repo.sessions() as session:
        query = select(func.count()).select_from(LedgerEntry).where(LedgerEntry.kind == "claim")
        return int(await session.scalar(query) or 0)


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
    assert await ledger_claims(repo) == 1
    assert await repo.confirmed_total(PROVIDER) == 900_000
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
    assert await ledger_claims(repo) == 1


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
