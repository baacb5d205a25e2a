"""Claims, delegations, gasless revocations and relayer webhooks in the database.

A claim (or revocation) moves requested → submitted → confirmed | failed and never back: every
update goes through `_advance`, which ignores anything older than what is stored, so webhooks,
the poller and the send path may report the same task in any order, any number of times.
A webhook is recorded in `webhook_events` in the same transaction as its effect, so a replay of
(event id, type) changes nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Final, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from quotra.chain.relayer import Submission, TxState
from quotra.store.models import (
    AllowanceRecord,
    Call,
    ClaimRecord,
    ConsumerAccount,
    DelegationRecord,
    RevocationRecord,
    SpendPermissionRecord,
    WebhookEventRecord,
    table,
    utcnow,
)
from quotra.store.repositories import Store
from quotra.store.sql import insert_ignore
from quotra.webhooks import RelayerEvent

CLAIM_PREFIX: Final = "clm_"
REVOCATION_PREFIX: Final = "rev_"
CLAIM_ID_PATTERN: Final = r"^clm_[0-9a-f]{24}$"
REVOCATION_ID_PATTERN: Final = r"^rev_[0-9a-f]{24}$"
OPEN: Final = ("requested", "submitted")
FINAL: Final = frozenset({"confirmed", "failed"})
_RANK: Final = {"requested": 0, "submitted": 1, "confirmed": 2, "failed": 2}

EventHandler = Callable[[AsyncSession, RelayerEvent], Awaitable[None]]
Row = TypeVar("Row", ClaimRecord, RevocationRecord)


def new_claim_id() -> str:
    return CLAIM_PREFIX + secrets.token_hex(12)


def new_revocation_id() -> str:
    return REVOCATION_PREFIX + secrets.token_hex(12)


def status_of(state: TxState) -> str | None:
    """Our status for a relayer state (None: still pending at the relayer)."""
    if state is TxState.SUBMITTED:
        return "submitted"
    if state is TxState.CONFIRMED:
        return "confirmed"
    if state in (TxState.REJECTED, TxState.REVERTED):
        return "failed"
    return None


@dataclass(frozen=True)
class ClaimView:
    id: str
    provider: str
    payee: str
    delegation_digest: str
    amount: int
    relayer_fee: int
    status: str
    relayer: str
    task_id: str | None
    tx_hash: str | None
    block_number: int | None
    error: str | None
    attempts: int
    next_check_at: datetime | None
    created_at: datetime
    updated_at: datetime
    kind: str = "escrow"  # or `erc7710`: redeemed through the DelegationManager
    redemption: str | None = None  # the redemption as sent (JSON), for an `erc7710` claim

    @classmethod
    def of(cls, row: ClaimRecord) -> ClaimView:
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class RevocationView:
    id: str
    account: str
    item: str
    kind: str
    signature: str
    status: str
    relayer: str
    task_id: str | None
    tx_hash: str | None
    error: str | None
    attempts: int
    next_check_at: datetime | None
    created_at: datetime
    updated_at: datetime
    redemption: str | None = None  # a `disableDelegation` redemption (JSON), else a signed Revocation

    @classmethod
    def of(cls, row: RevocationRecord) -> RevocationView:
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class DelegationView:
    digest: str
    provider: str
    delegate: str
    payee: str
    max_amount: int
    relayer_fee: int
    valid_until: int
    salt: int
    signature: str
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: DelegationRecord) -> DelegationView:
        return cls(
            digest=row.digest,
            provider=row.provider,
            delegate=row.delegate,
            payee=row.payee,
            max_amount=int(row.max_amount),
            relayer_fee=int(row.relayer_fee),
            valid_until=int(row.valid_until),
            salt=int(row.salt),
            signature=row.signature,
            revoked_at=row.revoked_at,
        )


class ClaimInFlight(Exception):
    """Another claim under the same delegation is not final yet."""


class ClaimsRepo:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.sessions = store.sessions
        self.dialect = store.dialect
        # Memo prefix -> handler, for relayer tasks other services send (gasless deposits, ...).
        self.handlers: dict[str, EventHandler] = {}

    def register(self, memo_prefix: str, handler: EventHandler) -> None:
        """Have `handler(session, event)` applied, inside the dedupe transaction, to verified
        webhooks whose memo starts with `memo_prefix`."""
        self.handlers[memo_prefix] = handler

    # ---- delegations ---------------------------------------------------------------------------

    async def save_delegation(
        self,
        *,
        digest: str,
        provider: str,
        delegate: str,
        payee: str,
        max_amount: int,
        relayer_fee: int,
        valid_until: int,
        salt: int,
        signature: str,
    ) -> DelegationView:
        values = {
            "digest": digest,
            "provider": provider,
            "delegate": delegate,
            "payee": payee,
            "max_amount": str(max_amount),
            "relayer_fee": str(relayer_fee),
            "valid_until": str(valid_until),
            "salt": str(salt),
            "signature": signature,
            "created_at": utcnow(),
        }
        async with self.sessions.begin() as session:
            await session.execute(insert_ignore(self.dialect, table(DelegationRecord), values))
            row = await session.get(DelegationRecord, digest)
            assert row is not None
            return DelegationView.of(row)

    async def get_delegation(self, digest: str) -> DelegationView | None:
        async with self.sessions() as session:
            row = await session.get(DelegationRecord, digest)
            return None if row is None else DelegationView.of(row)

    # ---- claims --------------------------------------------------------------------------------

    async def create_claim(
        self,
        *,
        claim_id: str,
        provider: str,
        payee: str,
        delegation_digest: str,
        amount: int,
        relayer_fee: int,
        relayer: str,
        task_id: str | None,
        next_check_at: datetime | None = None,
        kind: str = "escrow",
        redemption: str | None = None,
    ) -> ClaimView:
        """Insert a requested claim; `ClaimInFlight` if one under the same delegation is open."""
        async with self.sessions.begin() as session:
            # Lock the delegation row so two concurrent requests cannot both pass the check.
            await session.get(DelegationRecord, delegation_digest, with_for_update=True)
            open_claims = await session.scalar(
                select(func.count())
                .select_from(ClaimRecord)
                .where(ClaimRecord.delegation_digest == delegation_digest, ClaimRecord.status.in_(OPEN))
            )
            if open_claims:
                raise ClaimInFlight(delegation_digest)
            now = utcnow()
            row = ClaimRecord(
                id=claim_id,
                provider=provider,
                payee=payee,
                delegation_digest=delegation_digest,
                amount=amount,
                relayer_fee=relayer_fee,
                status="requested",
                relayer=relayer,
                task_id=task_id,
                attempts=0,
                next_check_at=next_check_at,
                kind=kind,
                redemption=redemption,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            await session.flush()
            return ClaimView.of(row)

    async def get_claim(self, claim_id: str) -> ClaimView | None:
        async with self.sessions() as session:
            row = await session.get(ClaimRecord, claim_id)
            return None if row is None else ClaimView.of(row)

    async def list_claims(self, provider: str, *, limit: int = 50, offset: int = 0) -> list[ClaimView]:
        query = (
            select(ClaimRecord)
            .where(ClaimRecord.provider == provider)
            .order_by(ClaimRecord.created_at.desc(), ClaimRecord.id)
            .limit(limit)
            .offset(offset)
        )
        async with self.sessions() as session:
            return [ClaimView.of(r) for r in (await session.scalars(query)).all()]

    async def revoked_digests(self, digests: list[str]) -> set[str]:
        """Which of these delegations have been revoked (or disabled) through the relay."""
        if not digests:
            return set()
        query = select(DelegationRecord.digest).where(
            DelegationRecord.digest.in_(digests), DelegationRecord.revoked_at.is_not(None)
        )
        async with self.sessions() as session:
            return set((await session.scalars(query)).all())

    async def confirmed_total(self, provider: str) -> int:
        query = select(func.coalesce(func.sum(ClaimRecord.amount), 0)).where(
            ClaimRecord.provider == provider, ClaimRecord.status == "confirmed"
        )
        async with self.sessions() as session:
            return int(await session.scalar(query) or 0)

    # ---- revocations ---------------------------------------------------------------------------

    async def create_revocation(
        self,
        *,
        revocation_id: str,
        account: str,
        item: str,
        signature: str,
        relayer: str,
        task_id: str | None,
        redemption: str | None = None,
    ) -> RevocationView:
        """Record the revocation and stop using the item at once: a tracked delegation is marked
        revoked and its unsent claims fail; a spend permission is marked revoked and stops being the
        consumer's active one; a periodic allowance is marked revoked (no more top-ups)."""
        now = utcnow()
        async with self.sessions.begin() as session:
            kind = "unknown"
            delegation = await session.get(DelegationRecord, item, with_for_update=True)
            if delegation is not None and delegation.provider == account:
                kind = "delegation"
                delegation.revoked_at = delegation.revoked_at or now
                await session.execute(
                    update(ClaimRecord)
                    .where(
                        ClaimRecord.delegation_digest == item,
                        ClaimRecord.status == "requested",
                        ClaimRecord.task_id.is_(None),
                    )
                    .values(status="failed", error="delegation revoked", updated_at=now)
                )
            permission = await session.get(SpendPermissionRecord, item, with_for_update=True)
            if permission is not None and permission.consumer == account:
                kind = "permission"
                permission.revoked_at = permission.revoked_at or now
                await session.execute(
                    update(ConsumerAccount)
                    .where(ConsumerAccount.wallet == account, ConsumerAccount.permission_digest == item)
                    .values(permission_digest=None)
                )
            allowance = await session.get(AllowanceRecord, item, with_for_update=True)
            if allowance is not None and allowance.wallet == account:
                kind = "allowance"
                allowance.revoked_at = allowance.revoked_at or now
            row = RevocationRecord(
                id=revocation_id,
                account=account,
                item=item,
                kind=kind,
                signature=signature,
                status="requested",
                relayer=relayer,
                task_id=task_id,
                attempts=0,
                redemption=redemption,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            await session.flush()
            return RevocationView.of(row)

    async def get_revocation(self, revocation_id: str) -> RevocationView | None:
        async with self.sessions() as session:
            row = await session.get(RevocationRecord, revocation_id)
            return None if row is None else RevocationView.of(row)

    # ---- task progress (claims and revocations alike) ------------------------------------------

    @staticmethod
    def _model(row_id: str) -> type[ClaimRecord] | type[RevocationRecord]:
        return RevocationRecord if row_id.startswith(REVOCATION_PREFIX) else ClaimRecord

    async def _advance(self, session: AsyncSession, row_id: str, sub: Submission) -> bool:
        """Apply what a relayer reported; True if it changed anything."""
        model = self._model(row_id)
        row: Any = await session.get(model, row_id, with_for_update=True)
        if row is None:
            return False
        if row.task_id and sub.id and row.task_id != sub.id:
            return False  # a task that is not this row's
        status = status_of(sub.state)
        changed = False
        if row.task_id is None and sub.id:
            row.task_id, changed = sub.id, True
        newer = status is not None and row.status not in FINAL and _RANK[status] >= _RANK[row.status]
        if newer and (status != row.status or (sub.tx_hash and sub.tx_hash != row.tx_hash)):
            row.status = status
            row.tx_hash = sub.tx_hash or row.tx_hash
            row.error = sub.error[:300] if status == "failed" and sub.error else row.error
            if model is ClaimRecord and sub.block_number is not None:
                row.block_number = sub.block_number
            changed = True
        if changed:
            row.updated_at = utcnow()
        return changed

    async def advance(self, row_id: str, sub: Submission) -> bool:
        async with self.sessions.begin() as session:
            return await self._advance(session, row_id, sub)

    async def fail(self, row_id: str, error: str) -> bool:
        """Mark an open row failed (a refusal before anything reached the chain)."""
        return await self.advance(row_id, Submission("", TxState.REJECTED, error=error))

    async def reschedule(self, row_id: str, *, attempts: int, next_check_at: datetime) -> None:
        model = self._model(row_id)
        async with self.sessions.begin() as session:
            await session.execute(
                update(model).where(model.id == row_id).values(attempts=attempts, next_check_at=next_check_at)
            )

    async def due_claims(self, now: datetime, *, limit: int = 50) -> list[ClaimView]:
        query = (
            select(ClaimRecord)
            .where(
                ClaimRecord.status.in_(OPEN),
                (ClaimRecord.next_check_at.is_(None)) | (ClaimRecord.next_check_at <= now),
            )
            .order_by(ClaimRecord.created_at)
            .limit(limit)
        )
        async with self.sessions() as session:
            return [ClaimView.of(r) for r in (await session.scalars(query)).all()]

    async def due_revocations(self, now: datetime, *, limit: int = 50) -> list[RevocationView]:
        query = (
            select(RevocationRecord)
            .where(
                RevocationRecord.status.in_(OPEN),
                (RevocationRecord.next_check_at.is_(None)) | (RevocationRecord.next_check_at <= now),
            )
            .order_by(RevocationRecord.created_at)
            .limit(limit)
        )
        async with self.sessions() as session:
            return [RevocationView.of(r) for r in (await session.scalars(query)).all()]

    async def next_check(self) -> datetime | None:
        """When the earliest open claim or revocation is due (one never scheduled is due at
        once: its creation time); None when none is open."""
        async with self.sessions() as session:
            due = []
            for model in (ClaimRecord, RevocationRecord):
                row = (
                    await session.execute(
                        select(model.next_check_at, model.created_at)
                        .where(model.status.in_(OPEN))
                        .order_by(model.next_check_at.asc().nulls_first())
                        .limit(1)
                    )
                ).first()
                if row is not None:
                    due.append(row.created_at if row.next_check_at is None else row.next_check_at)
        return min(due, default=None)

    # ---- webhooks ------------------------------------------------------------------------------

    async def record_event(self, event: RelayerEvent, sub: Submission) -> bool:
        """Apply a verified webhook once; False for a replay (acknowledged, no effect)."""
        values = {
            "event_id": event.event_id[:256],
            "type": event.type,
            "format": event.format,
            "task_id": event.task_id[:100],
            "memo": event.memo[:256] if event.memo else None,
            "status": event.status,
            "received_at": utcnow(),
        }
        async with self.sessions.begin() as session:
            result = await session.execute(insert_ignore(self.dialect, table(WebhookEventRecord), values))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return False
            memo = event.memo or ""
            if memo.startswith((CLAIM_PREFIX, REVOCATION_PREFIX)):
                await self._advance(session, memo, sub)
            else:
                for prefix, handler in self.handlers.items():
                    if memo.startswith(prefix):
                        await handler(session, event)
                        break
            return True

    async def events_count(self) -> int:
        async with self.sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(WebhookEventRecord)) or 0)

    # ---- earnings ------------------------------------------------------------------------------

    async def listing_earnings(self, provider: str) -> dict[str, int]:
        """A provider's share per listing of its settled calls (refunded ones are not counted):
        amount minus the platform fee."""
        share = func.coalesce(func.sum(Call.amount - func.coalesce(Call.fee, 0)), 0)
        query = (
            select(Call.listing_id, share)
            .where(Call.provider == provider, Call.state == "settled", Call.gate.in_(("x402", "prepaid")))
            .group_by(Call.listing_id)
        )
        async with self.sessions() as session:
            return {
                str(listing_id): int(amount) for listing_id, amount in (await session.execute(query)).all()
            }
