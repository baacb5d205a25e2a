"""The settlement outbox: captured calls taken into settlement batches, and what the chain did.

x402 calls settle in `settle_authorizations` batches, prepaid calls in `settle_charges` batches (one
per spend permission). Every step is one transaction run by `quotra.store.transactions.Transactions`
and every transition a conditional UPDATE, so the worker, the indexer and a restarted process
racing over one call apply it once. On PostgreSQL the rows are taken with `FOR UPDATE SKIP LOCKED`.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import BigInteger, String, bindparam, case, exists, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from quotra.calls.records import FRONT_RUN
from quotra.money import allocate_fees, split_fee
from quotra.store.direct import prepared
from quotra.store.models import (
    Call,
    ChainCursor,
    ConsumerAccount,
    SettlementBatch,
    SpendPermissionRecord,
    X402Authorization,
    X402Payer,
    table,
    utcnow,
)
from quotra.store.prepaid_repo import PermissionView
from quotra.store.sql import record
from quotra.store.transactions import Transactions

CALLS: Final = table(Call)
AUTHS: Final = table(X402Authorization)
PAYERS: Final = table(X402Payer)
BATCHES: Final = table(SettlementBatch)
ACCOUNTS: Final = table(ConsumerAccount)
PERMISSIONS: Final = table(SpendPermissionRecord)
OPEN_BATCH: Final = ("pending", "submitted")


@dataclass(frozen=True)
class X402Payment:
    """An x402 call as the settlement worker sees it: the call and its authorization. `value` is
    what the payer authorized, `amount` what the call was charged (at most `value`; the escrow
    credits the rest to the payer's deposit)."""

    call_id: str
    payer: str
    nonce: str
    value: int
    amount: int
    valid_after: int
    valid_before: int
    signature: str
    listing_id: str
    provider: str
    state: str
    batch_id: int | None
    tx_hash: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def nonce_bytes(self) -> bytes:
        return bytes.fromhex(self.nonce.removeprefix("0x"))


_X402_COLUMNS: Final = (
    CALLS.c.id.label("call_id"),
    AUTHS.c.payer,
    AUTHS.c.nonce,
    AUTHS.c.value,
    CALLS.c.amount,
    AUTHS.c.valid_after,
    AUTHS.c.valid_before,
    AUTHS.c.signature,
    CALLS.c.listing_id,
    CALLS.c.provider,
    CALLS.c.state,
    CALLS.c.batch_id,
    CALLS.c.tx_hash,
    CALLS.c.error,
    CALLS.c.created_at,
    CALLS.c.updated_at,
)


@dataclass(frozen=True)
class Charge:
    """A captured prepaid call, as the settlement worker batches it: `amount` charged, `markup`
    of it the app developer's, the rest (`base`) the provider's and the platform's."""

    call_id: str
    consumer: str
    permission_digest: str
    listing_id: str
    provider: str
    amount: int
    markup: int
    state: str
    batch_id: int | None

    @property
    def base(self) -> int:
        return self.amount - self.markup


@dataclass(frozen=True)
class BatchRow:
    id: int
    kind: str
    status: str
    permission_digest: str | None
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


def _aware(value: Any) -> datetime:
    """An aggregate's datetime (drivers may hand it back naive, or as text on SQLite) in UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _locked(connection: Connection, query: Any) -> Any:
    return query.with_for_update(skip_locked=True) if connection.dialect.name == "postgresql" else query


def _new_batch(connection: Connection, kind: str, digest: str | None, now: datetime) -> int:
    return int(
        connection.execute(
            insert(BATCHES)
            .values(
                kind=kind,
                status="pending",
                permission_digest=digest,
                reference="0x" + secrets.token_hex(32),
                amount=0,
                items=0,
                attempts=0,
                created_at=now,
                updated_at=now,
            )
            .returning(BATCHES.c.id)
        ).scalar_one()
    )


def _move(connection: Connection, call_id: str, from_states: Iterable[str], **values: Any) -> bool:
    """One call on from one of `from_states`; False if it was elsewhere (someone else moved it)."""
    result = connection.execute(
        update(CALLS).where(CALLS.c.id == call_id, CALLS.c.state.in_(tuple(from_states))).values(**values)
    )
    return int(result.rowcount) == 1


# ---- forming batches ------------------------------------------------------------------------------


def _claim_x402(
    connection: Connection, limit: int, now_ts: int, min_validity: int, now: datetime
) -> int | None:
    rows = connection.execute(
        _locked(
            connection,
            select(CALLS.c.id, AUTHS.c.valid_before, CALLS.c.amount)
            .join(AUTHS, AUTHS.c.call_id == CALLS.c.id)
            .where(CALLS.c.state == "captured", CALLS.c.gate == "x402")
            .order_by(CALLS.c.created_at, CALLS.c.id)
            .limit(limit),
        )
    ).all()
    live = []
    for call_id, valid_before, charged in rows:
        if valid_before <= now_ts + min_validity:  # could not be mined in time any more
            _fail_x402(connection, call_id, "expired before settlement", now, payer_fault=False)
        else:
            live.append((call_id, charged))
    if not live:
        return None
    batch_id = _new_batch(connection, "x402", None, now)
    connection.execute(
        update(CALLS)
        .where(CALLS.c.id.in_([c for c, _ in live]))
        .values(state="settling", batch_id=batch_id, updated_at=now)
    )
    connection.execute(
        update(BATCHES)
        .where(BATCHES.c.id == batch_id)
        .values(amount=sum(charged for _, charged in live), items=len(live))
    )
    return batch_id


def _claim_charges(connection: Connection, digest: str, limit: int, now: datetime) -> int | None:
    rows = connection.execute(
        _locked(
            connection,
            select(CALLS.c.id, CALLS.c.amount)
            .where(
                CALLS.c.state == "captured",
                CALLS.c.gate == "prepaid",
                CALLS.c.permission_digest == digest,
            )
            .order_by(CALLS.c.created_at, CALLS.c.id)
            .limit(limit),
        )
    ).all()
    if not rows:
        return None
    batch_id = _new_batch(connection, "charges", digest, now)
    connection.execute(
        update(CALLS)
        .where(CALLS.c.id.in_([r.id for r in rows]))
        .values(state="settling", batch_id=batch_id, updated_at=now)
    )
    connection.execute(
        update(BATCHES)
        .where(BATCHES.c.id == batch_id)
        .values(amount=sum(r.amount for r in rows), items=len(rows))
    )
    return batch_id


# ---- outcomes -------------------------------------------------------------------------------------


# A landed batch settles up to 64 calls, one or two statements each: built once, run directly.
_SETTLE_X402: Final = prepared(
    update(CALLS)
    .where(
        CALLS.c.id == bindparam("b_call"),
        or_(*(CALLS.c.state == state for state in ("captured", "settling", "reconciling"))),
    )
    .values(
        state="settled",
        tx_hash=bindparam("b_tx"),
        fee=bindparam("b_fee", type_=BigInteger),
        # FRONT_RUN on a reconciled call: its payer's rest did not go to its deposit.
        error=bindparam("b_error"),
        updated_at=bindparam("b_now"),
    )
)
_SETTLED_BLOCK: Final = prepared(
    update(AUTHS)
    .where(AUTHS.c.call_id == bindparam("b_call"))
    .values(settled_block=bindparam("b_block", type_=BigInteger))
)
_CONFIRM_BATCH: Final = prepared(
    update(BATCHES)
    .where(BATCHES.c.id == bindparam("b_batch"), or_(*(BATCHES.c.status == status for status in OPEN_BATCH)))
    .values(
        status="confirmed",
        tx_hash=bindparam("b_tx"),
        gas_used=bindparam("b_gas"),
        updated_at=bindparam("b_now"),
    )
    .returning(BATCHES.c.permission_digest)
)
_BATCH_CHARGES: Final = prepared(
    select(CALLS.c.id, CALLS.c.payer, CALLS.c.provider, CALLS.c.amount, CALLS.c.markup)
    .where(CALLS.c.batch_id == bindparam("b_batch"), CALLS.c.state == "settling")
    .order_by(CALLS.c.created_at, CALLS.c.id)
)
_TOTAL: Final = bindparam("b_total", type_=BigInteger)
_DIGEST: Final = bindparam("b_digest", type_=String)
# The consumer's mirror moves from unsettled to spent (its permission's only if the batch was under
# its active one), and so does the permission's budget, each floored at zero; SQLite's
# two-argument `max` or PostgreSQL's `greatest` (keyed by "is SQLite").
_SPEND_ACCOUNT: Final = {
    sqlite: prepared(
        update(ACCOUNTS)
        .where(ACCOUNTS.c.wallet == bindparam("b_wallet"))
        .values(
            unsettled=floor(ACCOUNTS.c.unsettled - _TOTAL, 0),
            deposit=floor(ACCOUNTS.c.deposit - _TOTAL, 0),
            permission_spent=case(
                (ACCOUNTS.c.permission_digest == _DIGEST, ACCOUNTS.c.permission_spent + _TOTAL),
                else_=ACCOUNTS.c.permission_spent,
            ),
        )
    )
    for sqlite, floor in ((True, func.max), (False, func.greatest))
}
_SPEND_PERMISSION: Final = {
    sqlite: prepared(
        update(PERMISSIONS)
        .where(PERMISSIONS.c.digest == _DIGEST)
        .values(unsettled=floor(PERMISSIONS.c.unsettled - _TOTAL, 0), spent=PERMISSIONS.c.spent + _TOTAL)
    )
    for sqlite, floor in ((True, func.max), (False, func.greatest))
}
_SETTLE_CHARGE: Final = prepared(
    update(CALLS)
    .where(CALLS.c.id == bindparam("b_call"), CALLS.c.state == "settling")
    .values(
        state="settled",
        fee=bindparam("b_fee", type_=BigInteger),
        tx_hash=bindparam("b_tx"),
        updated_at=bindparam("b_now"),
    )
)


def _settle_x402(
    connection: Connection, call_id: str, tx_hash: str, fee: int, block: int, reconciled: bool, now: datetime
) -> bool:
    moved = connection.execute(
        _SETTLE_X402,
        {
            "b_call": call_id,
            "b_tx": tx_hash,
            "b_fee": fee,
            "b_error": FRONT_RUN if reconciled else None,
            "b_now": now,
        },
    )
    if int(moved.rowcount) != 1:
        return False
    if not reconciled:  # the payer's USDC left in `block` (a reconciled one's left when front-run)
        connection.execute(_SETTLED_BLOCK, {"b_call": call_id, "b_block": block})
    return True


def _count_unpaid(connection: Connection, call_id: str) -> None:
    """The call's payer did not pay for it through the escrow: it is refused x402 from now on."""
    payer = select(AUTHS.c.payer).where(AUTHS.c.call_id == call_id).scalar_subquery()
    connection.execute(update(PAYERS).where(PAYERS.c.payer == payer).values(unpaid=PAYERS.c.unpaid + 1))


def _mark_reconciling(connection: Connection, call_id: str, error: str, block: int, now: datetime) -> bool:
    """USDC marks the authorization used but the escrow never credited it: used outside the escrow
    (front-run) or cancelled by its payer. The operator makes the provider whole."""
    if not _move(
        connection, call_id, ["captured", "settling"], state="reconciling", error=error[:300], updated_at=now
    ):
        return False
    # The front-run moved the payer's USDC at `block` at the latest.
    connection.execute(update(AUTHS).where(AUTHS.c.call_id == call_id).values(settled_block=block))
    _count_unpaid(connection, call_id)
    return True


def _fail_x402(connection: Connection, call_id: str, error: str, now: datetime, *, payer_fault: bool) -> bool:
    """Served, but its authorization can never pay: no money moved. `payer_fault` when USDC
    refused it (its payer moved the money away); not when it expired before the relay settled it."""
    if not _move(
        connection,
        call_id,
        ["captured", "settling", "reconciling"],
        state="failed",
        error=error[:300],
        updated_at=now,
    ):
        return False
    connection.execute(update(AUTHS).where(AUTHS.c.call_id == call_id).values(pending=False))
    if payer_fault:
        _count_unpaid(connection, call_id)
    return True


def _fail_batch(connection: Connection, batch_id: int, error: str, now: datetime) -> None:
    connection.execute(
        update(BATCHES)
        .where(BATCHES.c.id == batch_id)
        .values(status="failed", error=error[:300], updated_at=now)
    )
    failed = connection.execute(
        select(CALLS.c.id).where(CALLS.c.batch_id == batch_id, CALLS.c.state == "settling")
    ).scalars()
    for call_id in list(failed):
        if not _fail_x402(connection, call_id, error, now, payer_fault=False):
            _move(connection, call_id, ["settling"], state="failed", error=error[:300], updated_at=now)


def _settle_charges(
    connection: Connection,
    batch_id: int,
    tx_hash: str,
    gas_used: int | None,
    fee_bps: int,
    total_fee: int,
    now: datetime,
) -> bool:
    """A `settle_charges` batch landed: its calls are settled with their fees (allocated over their
    base cost, without the markup, so that each provider's add up to the escrow's), and the
    consumer's mirror and the permission's budget move from unsettled to spent (markups
    included); the account's permission mirror only if the batch was under its active one."""
    closed = connection.execute(
        _CONFIRM_BATCH,
        {"b_batch": batch_id, "b_tx": tx_hash, "b_gas": gas_used, "b_now": now},
    ).first()
    if closed is None:
        return False
    rows = connection.execute(_BATCH_CHARGES, {"b_batch": batch_id}).all()
    by_provider: dict[str, list[Any]] = {}
    for row in rows:
        by_provider.setdefault(row.provider.lower(), []).append(row)
    fees_left = total_fee
    groups = list(by_provider.values())
    for index, group in enumerate(groups):
        amounts = [r.amount - r.markup for r in group]
        group_fee = fees_left if index == len(groups) - 1 else split_fee(sum(amounts), fee_bps)
        fees_left -= group_fee
        for row, fee in zip(group, allocate_fees(amounts, group_fee, fee_bps), strict=True):
            connection.execute(
                _SETTLE_CHARGE, {"b_call": row.id, "b_fee": fee, "b_tx": tx_hash, "b_now": now}
            )
    if rows:
        sqlite = connection.dialect.name == "sqlite"
        spent = {"b_digest": closed[0], "b_total": sum(r.amount for r in rows)}
        connection.execute(_SPEND_ACCOUNT[sqlite], {**spent, "b_wallet": rows[0].payer})
        connection.execute(_SPEND_PERMISSION[sqlite], spent)
    return True


def _set_cursor(connection: Connection, contract: str, block: int, now: datetime) -> None:
    cursors = table(ChainCursor)
    updated = connection.execute(
        update(cursors).where(cursors.c.contract == contract).values(block=block, updated_at=now)
    )
    if int(updated.rowcount) == 0:
        connection.execute(insert(cursors).values(contract=contract, block=block, updated_at=now))


class Outbox:
    def __init__(self, engine: AsyncEngine, transactions: Transactions) -> None:
        self.engine = engine
        self.transactions = transactions

    async def _read(self, query: Any) -> list[Any]:
        async with self.engine.connect() as connection:
            return list((await connection.execute(query)).all())

    async def _write(self, work: Callable[..., Any], *args: Any) -> Any:
        return await self.transactions.run(work, *args)

    # ---- forming batches ------------------------------------------------------------------------

    async def x402_backlog(self) -> tuple[int, datetime | None, int | None]:
        """Captured x402 calls: how many, the oldest capture, the earliest expiry."""
        (count, oldest, expiry), *_ = await self._read(
            select(func.count(), func.min(CALLS.c.updated_at), func.min(AUTHS.c.valid_before))
            .join(AUTHS, AUTHS.c.call_id == CALLS.c.id)
            .where(CALLS.c.state == "captured", CALLS.c.gate == "x402")
        )
        return int(count), None if oldest is None else _aware(oldest), None if expiry is None else int(expiry)

    async def claim_x402_batch(self, limit: int, now_ts: int, min_validity: int) -> BatchRow | None:
        """Up to `limit` captured x402 calls into a new pending batch; those expiring within
        `min_validity` seconds can no longer settle safely and are failed instead."""
        batch_id = await self._write(_claim_x402, limit, now_ts, min_validity, utcnow())
        return None if batch_id is None else await self.get_batch(batch_id)

    async def charge_backlog(self) -> list[tuple[str, datetime]]:
        """Spend permissions with captured calls, and each one's oldest capture."""
        rows = await self._read(
            select(CALLS.c.permission_digest, func.min(CALLS.c.updated_at))
            .where(CALLS.c.state == "captured", CALLS.c.gate == "prepaid")
            .group_by(CALLS.c.permission_digest)
        )
        return [(str(digest), _aware(oldest)) for digest, oldest in rows]

    async def claim_charge_batch(self, digest: str, limit: int) -> BatchRow | None:
        batch_id = await self._write(_claim_charges, digest, limit, utcnow())
        return None if batch_id is None else await self.get_batch(batch_id)

    # ---- batches in flight ----------------------------------------------------------------------

    async def has_work(self) -> bool:
        """Whether anything waits for the settlement worker: calls captured, settling or being
        reconciled, or batches not closed (one indexed lookup: what an idle worker asks)."""
        waiting = exists().where(CALLS.c.state.in_(("captured", "settling", "reconciling")))
        open_batch = exists().where(BATCHES.c.status.in_(OPEN_BATCH))
        (row,) = await self._read(select(or_(waiting, open_batch)))
        return bool(row[0])

    async def batches(self, statuses: Iterable[str]) -> list[BatchRow]:
        rows = await self._read(
            select(BATCHES).where(BATCHES.c.status.in_(tuple(statuses))).order_by(BATCHES.c.id)
        )
        return [record(BatchRow, r) for r in rows]

    async def get_batch(self, batch_id: int) -> BatchRow | None:
        rows = await self._read(select(BATCHES).where(BATCHES.c.id == batch_id))
        return record(BatchRow, rows[0]) if rows else None

    async def batch_by_reference(self, reference: str) -> BatchRow | None:
        rows = await self._read(select(BATCHES).where(BATCHES.c.reference == reference.lower()))
        return record(BatchRow, rows[0]) if rows else None

    async def batch_x402(self, batch_id: int, states: Iterable[str] = ("settling",)) -> list[X402Payment]:
        rows = await self._read(
            select(*_X402_COLUMNS)
            .join(AUTHS, AUTHS.c.call_id == CALLS.c.id)
            .where(CALLS.c.batch_id == batch_id, CALLS.c.state.in_(tuple(states)))
            .order_by(CALLS.c.provider, CALLS.c.created_at, CALLS.c.id)
        )
        return [record(X402Payment, r) for r in rows]

    async def batch_charges(self, batch_id: int) -> list[Charge]:
        rows = await self._read(
            select(
                CALLS.c.id.label("call_id"),
                CALLS.c.payer.label("consumer"),
                CALLS.c.permission_digest,
                CALLS.c.listing_id,
                CALLS.c.provider,
                CALLS.c.amount,
                CALLS.c.markup,
                CALLS.c.state,
                CALLS.c.batch_id,
            )
            .where(CALLS.c.batch_id == batch_id)
            .order_by(CALLS.c.created_at, CALLS.c.id)
        )
        return [record(Charge, r) for r in rows]

    async def permission(self, digest: str) -> PermissionView | None:
        rows = await self._read(select(PERMISSIONS).where(PERMISSIONS.c.digest == digest))
        return record(PermissionView, rows[0]) if rows else None

    async def _batch_update(self, batch_id: int, statuses: Iterable[str], **values: Any) -> bool:
        def work(connection: Connection) -> bool:
            result = connection.execute(
                update(BATCHES)
                .where(BATCHES.c.id == batch_id, BATCHES.c.status.in_(tuple(statuses)))
                .values(**values, updated_at=utcnow())
            )
            return int(result.rowcount) == 1

        return bool(await self._write(work))

    async def start_attempt(self, batch_id: int) -> bool:
        """Counted before anything is sent: a pending batch with attempts may already be on-chain."""
        return await self._batch_update(batch_id, ["pending"], attempts=BATCHES.c.attempts + 1, error=None)

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
        """Gives up on a batch: its calls are failed (served, never paid) and reported."""
        await self._write(_fail_batch, batch_id, error, utcnow())

    # ---- x402 outcomes ----------------------------------------------------------------------------

    async def settle_x402(
        self, call_id: str, *, tx_hash: str, fee: int, block: int, reconciled: bool = False
    ) -> bool:
        """The escrow credited this call's payment (in a batch, or reconciled after a front-run)."""
        return bool(await self._write(_settle_x402, call_id, tx_hash, fee, block, reconciled, utcnow()))

    async def settle_x402_batch(self, fees: dict[str, int], *, tx_hash: str, block: int) -> int:
        """The escrow credited these calls' payments in one transaction (`fees`: call id → fee):
        recorded in one database transaction; how many were not recorded already."""

        def work(connection: Connection, now: datetime) -> int:
            return sum(
                _settle_x402(connection, call_id, tx_hash, fee, block, False, now)
                for call_id, fee in fees.items()
            )

        return int(await self._write(work, utcnow()))

    async def mark_reconciling(self, call_id: str, error: str, *, block: int) -> bool:
        return bool(await self._write(_mark_reconciling, call_id, error, block, utcnow()))

    async def fail_x402(self, call_id: str, error: str, *, payer_fault: bool) -> bool:
        return bool(
            await self._write(
                functools.partial(_fail_x402, payer_fault=payer_fault), call_id, error, utcnow()
            )
        )

    async def release_x402(self, call_id: str, error: str) -> bool:
        """settling → captured, out of its batch: taken again by a later batch."""

        def work(connection: Connection) -> bool:
            return _move(
                connection,
                call_id,
                ["settling"],
                state="captured",
                batch_id=None,
                error=error[:300],
                updated_at=utcnow(),
            )

        return bool(await self._write(work))

    async def refund_x402(self, call_id: str) -> bool:
        """settled → refunded (the call keeps the transaction that credited it; the refund's is in
        the escrow's `PaymentRefunded` event)."""

        def work(connection: Connection) -> bool:
            return _move(connection, call_id, ["settled"], state="refunded", updated_at=utcnow())

        return bool(await self._write(work))

    async def get_x402(self, call_id: str) -> X402Payment | None:
        rows = await self._read(
            select(*_X402_COLUMNS).join(AUTHS, AUTHS.c.call_id == CALLS.c.id).where(CALLS.c.id == call_id)
        )
        return record(X402Payment, rows[0]) if rows else None

    async def find_x402_many(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], X402Payment]:
        """The x402 calls of these (payer, nonce) pairs, in one query, by (payer, lower-case nonce)."""
        wanted = {(payer, nonce.lower()) for payer, nonce in keys}
        if not wanted:
            return {}
        rows = await self._read(
            select(*_X402_COLUMNS)
            .join(AUTHS, AUTHS.c.call_id == CALLS.c.id)
            .where(
                AUTHS.c.payer.in_({payer for payer, _ in wanted}), AUTHS.c.nonce.in_({n for _, n in wanted})
            )
        )
        found = (record(X402Payment, r) for r in rows)
        return {(p.payer, p.nonce): p for p in found if (p.payer, p.nonce) in wanted}

    async def x402_in(self, states: Iterable[str], limit: int = 10_000) -> list[X402Payment]:
        rows = await self._read(
            select(*_X402_COLUMNS)
            .join(AUTHS, AUTHS.c.call_id == CALLS.c.id)
            .where(CALLS.c.state.in_(tuple(states)))
            .order_by(CALLS.c.created_at)
            .limit(limit)
        )
        return [record(X402Payment, r) for r in rows]

    # ---- prepaid outcomes ---------------------------------------------------------------------------

    async def settle_charges(
        self, batch: BatchRow, *, tx_hash: str, gas_used: int | None, fee_bps: int, total_fee: int
    ) -> bool:
        return bool(
            await self._write(_settle_charges, batch.id, tx_hash, gas_used, fee_bps, total_fee, utcnow())
        )

    # ---- the indexer's cursor and the books ---------------------------------------------------------

    async def cursor(self, contract: str) -> int | None:
        cursors = table(ChainCursor)
        rows = await self._read(select(cursors.c.block).where(cursors.c.contract == contract))
        return int(rows[0][0]) if rows else None

    async def set_cursor(self, contract: str, block: int) -> None:
        await self._write(_set_cursor, contract, block, utcnow())

    async def credited_by_provider(self) -> dict[str, tuple[int, int]]:
        """provider → (amount, fee) of its calls the escrow credited and did not refund (x402 and
        prepaid; a call's base cost, without an app's markup), and app developer → (markups, 0)
        (credited to the developer its charges' permission names): what each one's `Credited`
        events must add up to."""
        settled = CALLS.c.state == "settled"
        rows = await self._read(
            select(
                CALLS.c.provider,
                func.coalesce(func.sum(case((settled, CALLS.c.amount - CALLS.c.markup), else_=0)), 0),
                func.coalesce(func.sum(case((settled, CALLS.c.fee), else_=0)), 0),
            )
            .where(CALLS.c.gate.in_(("x402", "prepaid")), CALLS.c.state.in_(("settled", "refunded")))
            .group_by(CALLS.c.provider)
        )
        books = {str(p): (int(a), int(f)) for p, a, f in rows}
        markups = await self._read(
            select(PERMISSIONS.c.developer, func.sum(CALLS.c.markup))
            .join(PERMISSIONS, PERMISSIONS.c.digest == CALLS.c.permission_digest)
            .where(CALLS.c.gate == "prepaid", settled, CALLS.c.markup > 0)
            .group_by(PERMISSIONS.c.developer)
        )
        for developer, markup in markups:
            amount, fee = books.get(str(developer), (0, 0))
            books[str(developer)] = (amount + int(markup), fee)
        return books

    async def calls_in(
        self, states: Iterable[str], gates: Iterable[str]
    ) -> list[tuple[str, str, str | None]]:
        """(call id, state, error) of every call of `gates` in `states` (for the audit)."""
        rows = await self._read(
            select(CALLS.c.id, CALLS.c.state, CALLS.c.error)
            .where(CALLS.c.state.in_(tuple(states)), CALLS.c.gate.in_(tuple(gates)))
            .order_by(CALLS.c.created_at)
        )
        return [(str(i), str(s), e) for i, s, e in rows]

    async def stranded(self, before: float) -> list[tuple[str, str, str | None]]:
        """Calls still reserved whose deadline passed before `before` (a unix time): the sweeper
        should have voided them."""
        deadline = datetime.fromtimestamp(before, UTC)
        rows = await self._read(
            select(CALLS.c.id, CALLS.c.state, CALLS.c.error)
            .where(CALLS.c.state == "reserved", CALLS.c.expires_at < deadline)
            .order_by(CALLS.c.expires_at)
        )
        return [(str(i), str(s), e) for i, s, e in rows]
