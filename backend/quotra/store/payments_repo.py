"""The payments repository: x402 reservations, the settlement outbox and its batches, the ledger.

Every state change is one short transaction that also appends its ledger entry, and every
transition is a conditional UPDATE (`WHERE status = <expected>`), so a worker, an indexer and a
restarted process racing over the same row apply it once. On SQLite each transaction starts
with its write (SQLite takes the write lock there, so a read-then-write transaction can never
be refused half-way); on PostgreSQL the outbox rows are taken with `FOR UPDATE SKIP LOCKED`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Final, Literal

from sqlalchemy import func, insert, literal, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from quotra.chain import eip712
from quotra.chain.client import PaymentArgs
from quotra.store import ledger
from quotra.store.models import (
    ChainCursor,
    ConsumerAccount,
    LedgerEntry,
    PrepaidCharge,
    SettlementBatch,
    SpendPermissionRecord,
    X402Payment,
    utcnow,
)
from quotra.store.repositories import Store

# x402 rows whose amount may still leave the payer's wallet: counted against the balance.
UNSETTLED: Final = ("reserved", "captured", "settling", "reconciling")
OPEN_BATCH: Final = ("pending", "submitted")
MAX_BPS: Final = 10_000


class NonceAlreadyReserved(Exception):
    """This (payer, nonce) was presented before: one authorization pays for one call."""


class InsufficientFunds(Exception):
    """The payer's balance does not cover this payment on top of its unsettled ones."""


def settlement_id(payment_id: int) -> str:
    return f"x402_{payment_id}"


@dataclass(frozen=True)
class X402Row:
    id: int
    payer: str
    nonce: str
    amount: int
    valid_after: int
    valid_before: int
    signature: str
    listing_id: str
    provider: str
    call_id: int | None
    status: str
    batch_id: int | None
    tx_hash: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: X402Payment) -> X402Row:
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})

    @property
    def nonce_bytes(self) -> bytes:
        return bytes.fromhex(self.nonce.removeprefix("0x"))

    def payment_args(self) -> PaymentArgs:
        return PaymentArgs(
            payer=self.payer,
            provider=self.provider,
            amount=self.amount,
            valid_after=self.valid_after,
            valid_before=self.valid_before,
            nonce=self.nonce_bytes,
            signature=eip712.Signature.from_bytes(self.signature),
        )


@dataclass(frozen=True)
class BatchRow:
    id: int
    kind: str
    status: str
    permission_digest: str | None
    expected_spent: int | None
    reference: str
    amount: int
    items: int
    submission_id: str | None
    tx_hash: str | None
    gas_used: int | None
    attempts: int
    next_attempt_at: datetime | None
    error: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: SettlementBatch) -> BatchRow:
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class ChargeRow:
    id: int
    consumer: str
    permission_digest: str
    listing_id: str
    provider: str
    amount: int
    status: str
    batch_id: int | None

    @classmethod
    def of(cls, row: PrepaidCharge) -> ChargeRow:
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class PermissionRow:
    digest: str
    consumer: str
    spender: str
    allowance: int
    valid_after: int
    valid_until: int
    salt: str
    signature: str
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: SpendPermissionRecord) -> PermissionRow:
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


def _aware(value: Any) -> datetime:
    """An aggregate's datetime (drivers may hand it back naive, or as text on SQLite) in UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def split_fee(amount: int, fee_bps: int) -> int:
    return amount * fee_bps // MAX_BPS


def allocate_fees(amounts: list[int], total_fee: int, fee_bps: int) -> list[int]:
    """Per-call fees of calls the escrow charged as one sum: each call's own fee, and what the
    rounding of the sum adds goes to the last call, so the parts add up to the escrow's fee."""
    fees = [split_fee(a, fee_bps) for a in amounts]
    if fees:
        fees[-1] += total_fee - sum(fees)
    return fees


class PaymentsRepo:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.sessions = store.sessions
        self.dialect = store.dialect

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    # ---- the paid-call path ----------------------------------------------------------------------

    async def pending_x402(self, payer: str) -> int:
        """What this payer's unsettled authorizations add up to."""
        query = select(func.coalesce(func.sum(X402Payment.amount), 0)).where(
            X402Payment.payer == payer, X402Payment.status.in_(UNSETTLED)
        )
        async with self.sessions() as session:
            return int((await session.execute(query)).scalar_one())

    async def reserve_x402(
        self,
        *,
        payer: str,
        nonce: str,
        amount: int,
        valid_after: int,
        valid_before: int,
        signature: str,
        listing_id: str,
        provider: str,
        balance: int,
    ) -> int:
        """Reserve (payer, nonce) for one call, atomically, if `balance` covers it on top of the
        payer's unsettled authorizations. Returns the row id; raises `NonceAlreadyReserved` or
        `InsufficientFunds` (nothing is written then)."""
        now = utcnow()
        values: dict[str, Any] = {
            "payer": payer,
            "nonce": nonce,
            "amount": amount,
            "valid_after": valid_after,
            "valid_before": valid_before,
            "signature": signature,
            "listing_id": listing_id,
            "provider": provider,
            "status": "reserved",
            "created_at": now,
            "updated_at": now,
        }
        table = X402Payment.__table__
        pending = (
            select(func.coalesce(func.sum(X402Payment.amount), 0))
            .where(X402Payment.payer == payer, X402Payment.status.in_(UNSETTLED))
            .scalar_subquery()
        )
        source = select(*(literal(v, table.c[k].type).label(k) for k, v in values.items())).where(
            pending + amount <= balance
        )
        statement = insert(X402Payment).from_select(list(values), source).returning(X402Payment.id)
        try:
            async with self.sessions.begin() as session:
                if self.is_postgres:
                    # One payer's reservations in turn: the sum above must see the previous one.
                    await session.execute(
                        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                        {"key": "x402:" + payer},
                    )
                inserted = (await session.execute(statement)).scalar_one_or_none()
                if inserted is None:
                    exists = await session.execute(
                        select(X402Payment.id).where(X402Payment.payer == payer, X402Payment.nonce == nonce)
                    )
                    if exists.first() is not None:
                        raise NonceAlreadyReserved(nonce)
                    raise InsufficientFunds(payer)
                return int(inserted)
        except IntegrityError as exc:
            raise NonceAlreadyReserved(nonce) from exc

    async def _x402_transition(
        self,
        session: AsyncSession,
        payment_id: int,
        from_status: Iterable[str],
        **values: Any,
    ) -> X402Row | None:
        """Move one row on if it is in one of `from_status`; the row after, or None."""
        values.setdefault("updated_at", utcnow())
        result = await session.execute(
            update(X402Payment)
            .where(X402Payment.id == payment_id, X402Payment.status.in_(tuple(from_status)))
            .values(**values)
            .returning(*X402Payment.__table__.c)
        )
        row = result.first()
        if row is None:
            return None
        return X402Row(**{f.name: getattr(row, f.name) for f in fields(X402Row)})

    async def capture_x402(self, payment_id: int) -> X402Row | None:
        """reserved → captured (the call was served); ledger `capture`. None if not reserved."""
        return await self._finish_x402(payment_id, status="captured", kind="capture")

    async def void_x402(self, payment_id: int) -> X402Row | None:
        """reserved → voided (the call failed: not charged); ledger `void`. None if not reserved."""
        return await self._finish_x402(payment_id, status="voided", kind="void")

    async def _finish_x402(
        self, payment_id: int, *, status: str, kind: Literal["capture", "void"]
    ) -> X402Row | None:
        """Ends a reservation and records it in the ledger, in one transaction."""
        async with self.sessions.begin() as session:
            row = await self._x402_transition(session, payment_id, ["reserved"], status=status)
            if row is not None:
                await ledger.append(
                    session,
                    kind=kind,
                    method="x402",
                    account=row.payer,
                    amount=row.amount,
                    provider=row.provider,
                    listing_id=row.listing_id,
                    reference=settlement_id(row.id),
                )
            return row

    async def get_x402(self, payment_id: int) -> X402Row | None:
        async with self.sessions() as session:
            row = await session.get(X402Payment, payment_id)
            return None if row is None else X402Row.of(row)

    async def find_x402(self, payer: str, nonce: str) -> X402Row | None:
        query = select(X402Payment).where(X402Payment.payer == payer, X402Payment.nonce == nonce.lower())
        async with self.sessions() as session:
            row = (await session.scalars(query)).first()
            return None if row is None else X402Row.of(row)

    async def x402_with_status(self, statuses: Iterable[str], limit: int = 10_000) -> list[X402Row]:
        query = (
            select(X402Payment)
            .where(X402Payment.status.in_(tuple(statuses)))
            .order_by(X402Payment.id)
            .limit(limit)
        )
        async with self.sessions() as session:
            return [X402Row.of(r) for r in (await session.scalars(query)).all()]

    # ---- forming batches -------------------------------------------------------------------------

    async def x402_backlog(self) -> tuple[int, datetime | None, int | None]:
        """Captured authorizations not in a batch: how many, the oldest capture, the earliest expiry."""
        query = select(
            func.count(), func.min(X402Payment.created_at), func.min(X402Payment.valid_before)
        ).where(X402Payment.status == "captured", X402Payment.batch_id.is_(None))
        async with self.sessions() as session:
            count, oldest, expiry = (await session.execute(query)).one()
        return int(count), None if oldest is None else _aware(oldest), None if expiry is None else int(expiry)

    def _locked(self, query: Any) -> Any:
        return query.with_for_update(skip_locked=True) if self.is_postgres else query

    async def claim_x402_batch(self, limit: int, now_ts: int, min_validity: int) -> BatchRow | None:
        """Take up to `limit` captured authorizations into a new pending batch. Those that expire
        within `min_validity` seconds can no longer settle safely: they are failed instead."""
        async with self.sessions.begin() as session:
            batch = SettlementBatch(
                kind="x402", status="pending", reference="0x" + secrets.token_hex(32), amount=0, items=0
            )
            session.add(batch)  # written first: SQLite takes its write lock here
            await session.flush()
            query = self._locked(
                select(X402Payment)
                .where(X402Payment.status == "captured", X402Payment.batch_id.is_(None))
                .order_by(X402Payment.created_at, X402Payment.id)
                .limit(limit)
            )
            rows = list((await session.scalars(query)).all())
            now = utcnow()
            live = []
            for row in rows:
                if row.valid_before <= now_ts + min_validity:
                    row.status, row.error, row.updated_at = "failed", "expired before settlement", now
                else:
                    live.append(row)
            if not live:
                await session.delete(batch)
                return None
            for row in live:
                row.status, row.batch_id, row.updated_at = "settling", batch.id, now
            batch.amount = sum(r.amount for r in live)
            batch.items = len(live)
            await session.flush()
            return BatchRow.of(batch)

    async def charge_backlog(self) -> list[tuple[str, datetime]]:
        """Permissions with captured charges not in a batch, and no batch of theirs in flight
        (their batches must apply in order: each names the amount spent before it)."""
        busy = select(SettlementBatch.permission_digest).where(
            SettlementBatch.kind == "charges", SettlementBatch.status.in_(OPEN_BATCH)
        )
        query = (
            select(PrepaidCharge.permission_digest, func.min(PrepaidCharge.created_at))
            .where(
                PrepaidCharge.status == "captured",
                PrepaidCharge.batch_id.is_(None),
                PrepaidCharge.permission_digest.not_in(busy.scalar_subquery()),
            )
            .group_by(PrepaidCharge.permission_digest)
        )
        async with self.sessions() as session:
            result = (await session.execute(query)).all()
        out = []
        for digest, oldest in result:
            out.append((str(digest), _aware(oldest)))
        return out

    async def claim_charge_batch(self, digest: str, limit: int) -> BatchRow | None:
        async with self.sessions.begin() as session:
            batch = SettlementBatch(
                kind="charges",
                status="pending",
                permission_digest=digest,
                reference="0x" + secrets.token_hex(32),
                amount=0,
                items=0,
            )
            session.add(batch)
            await session.flush()
            query = self._locked(
                select(PrepaidCharge)
                .where(
                    PrepaidCharge.permission_digest == digest,
                    PrepaidCharge.status == "captured",
                    PrepaidCharge.batch_id.is_(None),
                    PrepaidCharge.amount > 0,
                )
                .order_by(PrepaidCharge.id)
                .limit(limit)
            )
            rows = list((await session.scalars(query)).all())
            if not rows:
                await session.delete(batch)
                return None
            now = utcnow()
            for row in rows:
                row.status, row.batch_id, row.updated_at = "settling", batch.id, now
            batch.amount = sum(r.amount for r in rows)
            batch.items = len(rows)
            await session.flush()
            return BatchRow.of(batch)

    # ---- batches in flight -----------------------------------------------------------------------

    async def batches(self, statuses: Iterable[str]) -> list[BatchRow]:
        query = (
            select(SettlementBatch)
            .where(SettlementBatch.status.in_(tuple(statuses)))
            .order_by(SettlementBatch.id)
        )
        async with self.sessions() as session:
            return [BatchRow.of(r) for r in (await session.scalars(query)).all()]

    async def get_batch(self, batch_id: int) -> BatchRow | None:
        async with self.sessions() as session:
            row = await session.get(SettlementBatch, batch_id)
            return None if row is None else BatchRow.of(row)

    async def batch_by_reference(self, reference: str) -> BatchRow | None:
        query = select(SettlementBatch).where(SettlementBatch.reference == reference.lower())
        async with self.sessions() as session:
            row = (await session.scalars(query)).first()
            return None if row is None else BatchRow.of(row)

    async def batch_x402(self, batch_id: int, statuses: Iterable[str] = ("settling",)) -> list[X402Row]:
        query = (
            select(X402Payment)
            .where(X402Payment.batch_id == batch_id, X402Payment.status.in_(tuple(statuses)))
            .order_by(X402Payment.id)
        )
        async with self.sessions() as session:
            return [X402Row.of(r) for r in (await session.scalars(query)).all()]

    async def batch_charges(self, batch_id: int) -> list[ChargeRow]:
        query = select(PrepaidCharge).where(PrepaidCharge.batch_id == batch_id).order_by(PrepaidCharge.id)
        async with self.sessions() as session:
            return [ChargeRow.of(r) for r in (await session.scalars(query)).all()]

    async def get_charge(self, charge_id: int) -> ChargeRow | None:
        async with self.sessions() as session:
            row = await session.get(PrepaidCharge, charge_id)
            return None if row is None else ChargeRow.of(row)

    async def permission(self, digest: str) -> PermissionRow | None:
        async with self.sessions() as session:
            row = await session.get(SpendPermissionRecord, digest)
            return None if row is None else PermissionRow.of(row)

    async def _batch_update(self, batch_id: int, statuses: Iterable[str], **values: Any) -> bool:
        values.setdefault("updated_at", utcnow())
        async with self.sessions.begin() as session:
            result = await session.execute(
                update(SettlementBatch)
                .where(SettlementBatch.id == batch_id, SettlementBatch.status.in_(tuple(statuses)))
                .values(**values)
            )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def start_attempt(self, batch_id: int) -> bool:
        """Counted before anything is sent: a pending batch with attempts may already be on-chain."""
        return await self._batch_update(
            batch_id, ["pending"], attempts=SettlementBatch.attempts + 1, error=None
        )

    async def mark_submitted(self, batch_id: int, submission_id: str, tx_hash: str) -> bool:
        return await self._batch_update(
            batch_id, ["pending"], status="submitted", submission_id=submission_id, tx_hash=tx_hash
        )

    async def retry_later(self, batch_id: int, error: str, at: datetime) -> bool:
        """Back to pending (from pending or a submitted transaction that was lost or reverted)."""
        return await self._batch_update(
            batch_id, OPEN_BATCH, status="pending", error=error[:300], next_attempt_at=at
        )

    async def close_batch(
        self, batch_id: int, status: str, *, tx_hash: str | None = None, gas_used: int | None = None
    ) -> bool:
        values: dict[str, Any] = {"status": status}
        if tx_hash is not None:
            values["tx_hash"] = tx_hash
        if gas_used is not None:
            values["gas_used"] = gas_used
        return await self._batch_update(batch_id, OPEN_BATCH, **values)

    async def fail_batch(self, batch_id: int, error: str) -> None:
        """Gives up on a batch: its rows are failed (served, never paid) and reported."""
        now = utcnow()
        async with self.sessions.begin() as session:
            await session.execute(
                update(SettlementBatch)
                .where(SettlementBatch.id == batch_id)
                .values(status="failed", error=error[:300], updated_at=now)
            )
            await session.execute(
                update(X402Payment)
                .where(X402Payment.batch_id == batch_id, X402Payment.status == "settling")
                .values(status="failed", error=error[:300], updated_at=now)
            )
            await session.execute(
                update(PrepaidCharge)
                .where(PrepaidCharge.batch_id == batch_id, PrepaidCharge.status == "settling")
                .values(status="failed", updated_at=now)
            )

    # ---- x402 outcomes ---------------------------------------------------------------------------

    async def settle_x402(
        self,
        payment_id: int,
        *,
        tx_hash: str,
        fee: int,
        batch_id: int | None = None,
        reconciled: bool = False,
    ) -> bool:
        """The escrow credited this payment (PaymentSettled, or PaymentReconciled after a
        front-run): ledger `settle` / `reconcile` with the transaction. Once only."""
        status = "reconciled" if reconciled else "settled"
        async with self.sessions.begin() as session:
            row = await self._x402_transition(
                session, payment_id, ["captured", "settling", "reconciling"], status=status, tx_hash=tx_hash
            )
            if row is None:
                return False
            await ledger.append(
                session,
                kind="reconcile" if reconciled else "settle",
                method="x402",
                account=row.payer,
                amount=row.amount,
                fee=fee,
                provider=row.provider,
                listing_id=row.listing_id,
                reference=settlement_id(row.id),
                batch_id=batch_id if batch_id is not None else row.batch_id,
                tx_hash=tx_hash,
            )
            return True

    async def mark_reconciling(self, payment_id: int, error: str) -> bool:
        async with self.sessions.begin() as session:
            return (
                await self._x402_transition(
                    session, payment_id, ["captured", "settling"], status="reconciling", error=error[:300]
                )
                is not None
            )

    async def fail_x402(self, payment_id: int, error: str) -> bool:
        async with self.sessions.begin() as session:
            return (
                await self._x402_transition(
                    session,
                    payment_id,
                    ["captured", "settling", "reconciling"],
                    status="failed",
                    error=error[:300],
                )
                is not None
            )

    async def release_x402(self, payment_id: int, error: str) -> bool:
        """settling → captured, out of its batch: taken again by a later batch."""
        async with self.sessions.begin() as session:
            return (
                await self._x402_transition(
                    session, payment_id, ["settling"], status="captured", batch_id=None, error=error[:300]
                )
                is not None
            )

    async def refund_x402(self, payment_id: int, *, tx_hash: str, fee: int) -> bool:
        async with self.sessions.begin() as session:
            row = await self._x402_transition(
                session, payment_id, ["settled", "reconciled"], status="refunded", error=None
            )
            if row is None:
                return False
            await ledger.append(
                session,
                kind="refund",
                method="x402",
                account=row.payer,
                amount=row.amount,
                fee=fee,
                provider=row.provider,
                listing_id=row.listing_id,
                reference=settlement_id(row.id),
                tx_hash=tx_hash,
            )
            return True

    # ---- prepaid outcomes ------------------------------------------------------------------------

    async def settle_charges(
        self,
        batch: BatchRow,
        *,
        tx_hash: str,
        gas_used: int | None,
        fee_bps: int,
        total_fee: int,
    ) -> bool:
        """A `settle_charges` batch landed: its charges are settled, one ledger `settle` entry per
        call (fees allocated so that each provider's add up to the escrow's), and the consumer's
        mirrored position moves from unsettled to spent."""
        now = utcnow()
        async with self.sessions.begin() as session:
            result = await session.execute(
                update(SettlementBatch)
                .where(SettlementBatch.id == batch.id, SettlementBatch.status.in_(OPEN_BATCH))
                .values(status="confirmed", tx_hash=tx_hash, gas_used=gas_used, updated_at=now)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return False
            rows = list(
                (
                    await session.scalars(
                        select(PrepaidCharge)
                        .where(PrepaidCharge.batch_id == batch.id, PrepaidCharge.status == "settling")
                        .order_by(PrepaidCharge.id)
                    )
                ).all()
            )
            by_provider: dict[str, list[PrepaidCharge]] = {}
            for row in rows:
                by_provider.setdefault(row.provider.lower(), []).append(row)
            fees_left = total_fee
            groups = list(by_provider.values())
            for index, group in enumerate(groups):
                amounts = [r.amount for r in group]
                group_fee = split_fee(sum(amounts), fee_bps)
                if index == len(groups) - 1:
                    group_fee = fees_left  # the escrow's fee, exactly, whatever rounding did
                fees_left -= group_fee
                for row, fee in zip(group, allocate_fees(amounts, group_fee, fee_bps), strict=True):
                    row.status, row.updated_at = "settled", now
                    await ledger.append(
                        session,
                        kind="settle",
                        method="prepaid",
                        account=row.consumer,
                        amount=row.amount,
                        fee=fee,
                        provider=row.provider,
                        listing_id=row.listing_id,
                        call_id=row.call_id,
                        reference=f"prepaid_{row.id}",
                        batch_id=batch.id,
                        tx_hash=tx_hash,
                    )
            total = sum(r.amount for r in rows)
            if rows:
                consumer = rows[0].consumer
                await session.execute(
                    update(ConsumerAccount)
                    .where(ConsumerAccount.wallet == consumer)
                    .values(
                        unsettled=func.max(ConsumerAccount.unsettled - total, 0)
                        if self.dialect == "sqlite"
                        else func.greatest(ConsumerAccount.unsettled - total, 0),
                        deposit=func.max(ConsumerAccount.deposit - total, 0)
                        if self.dialect == "sqlite"
                        else func.greatest(ConsumerAccount.deposit - total, 0),
                        permission_spent=ConsumerAccount.permission_spent + total,
                    )
                )
            return True

    # ---- the indexer's cursor and the ledger -----------------------------------------------------

    async def cursor(self, contract: str) -> int | None:
        async with self.sessions() as session:
            row = await session.get(ChainCursor, contract)
            return None if row is None else int(row.block)

    async def set_cursor(self, contract: str, block: int) -> None:
        async with self.sessions.begin() as session:
            await session.execute(
                self.store._insert_ignore(ChainCursor.__table__, {"contract": contract, "block": block})
            )
            await session.execute(
                update(ChainCursor)
                .where(ChainCursor.contract == contract)
                .values(block=block, updated_at=utcnow())
            )

    async def ledger_sums(self, method: str) -> dict[tuple[str, str], tuple[int, int]]:
        """(kind, provider) → (sum of amounts, sum of fees) for one payment method."""
        query = (
            select(
                LedgerEntry.kind,
                LedgerEntry.provider,
                func.coalesce(func.sum(LedgerEntry.amount), 0),
                func.coalesce(func.sum(LedgerEntry.fee), 0),
            )
            .where(LedgerEntry.method == method)
            .group_by(LedgerEntry.kind, LedgerEntry.provider)
        )
        async with self.sessions() as session:
            rows = (await session.execute(query)).all()
        return {(k, provider or ""): (int(amount or 0), int(fee or 0)) for k, provider, amount, fee in rows}

    async def ledger_for(self, reference: str) -> list[tuple[str, int, int | None, str | None]]:
        query = (
            select(LedgerEntry.kind, LedgerEntry.amount, LedgerEntry.fee, LedgerEntry.tx_hash)
            .where(LedgerEntry.reference == reference)
            .order_by(LedgerEntry.id)
        )
        async with self.sessions() as session:
            return [(k, int(a), f, t) for k, a, f, t in (await session.execute(query)).all()]
