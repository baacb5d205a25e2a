"""The settlement worker: captured calls, settled into the escrow in batches.

Captured x402 calls become `settle_authorizations` batches (their payments listed provider by
provider); captured prepaid calls, per consumer permission, `settle_charges` batches (each under its
own reference, which the escrow settles once). A batch is sent when it is full, when its oldest
call is `max_age` old, or at once when an authorization nears its `validBefore`.

Crash safety: an attempt is counted in the database before anything is sent, so a `pending`
batch with attempts may already be on-chain; before sending it again the worker asks the chain
(USDC's `authorizationState` and the escrow's credit events; for charges whether the escrow has
settled the batch's reference, which it does once, and its `ChargesSettled` event) and records
what already landed, so nothing is paid twice. A `submitted` batch is followed by its transaction
hash, also after a restart. An authorization USDC refused (`PaymentFailed`) is checked: used
elsewhere (front-run) → `reconcile_authorization`, paid with the operator's own USDC, else
failed. RPC failures are retried with backoff. Fees are what the escrow's events say each
settlement was split at, never a rate remembered from earlier.

One worker per database settles: a PostgreSQL advisory lock elects it (the rows are taken with
`FOR UPDATE SKIP LOCKED` all the same); on SQLite a lock file beside the database does.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Final

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from quotra.calls.outbox import BatchRow, Outbox, X402Payment
from quotra.calls.records import FRONT_RUN
from quotra.chain import eip712
from quotra.chain.charges import aggregate
from quotra.chain.client import EscrowClient, PaymentArgs, PermissionArgs
from quotra.chain.relayer import DirectRelayer, RelayerError, Submission, TxState, wait_final
from quotra.metrics import Metrics
from quotra.payments.indexer import EscrowEvent, EscrowEvents
from quotra.store.models import utcnow

log = logging.getLogger("quotra.settlement")

LEADER_LOCK_KEY: Final = 0x51_55_4F_54_52_41_01  # "QUOTRA" + 1: the settlement leader
# Calls per `settle_charges` batch: their providers (one packed charge each) stay within MAX_CHARGES.
MAX_CHARGE_ROWS: Final = 256


@dataclass(frozen=True)
class SettlementConfig:
    batch_size: int = 64  # the most `settle_authorizations` takes
    max_age: float = 2.0
    poll: float = 0.25  # while something waits to settle
    idle: float = 5.0  # with nothing to settle: how soon captures by other replicas are noticed
    retry_base: float = 1.0
    retry_max: float = 60.0
    stuck_after: float = 120.0
    # An authorization expiring within this is not sent any more (it could not be mined in time)…
    min_validity: int = 10
    # …and one expiring within this is settled at once, whatever the batch size and age.
    urgent_window: int = 45
    confirm_within: float = 30.0


class LeaderLock:
    """One settlement leader per database: a PostgreSQL session advisory lock held on its own
    connection, or on SQLite an exclusive lock on a file beside the database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._connection: AsyncConnection | None = None
        self._file: IO[str] | None = None
        self.held = False

    def _lock_path(self) -> Path | None:
        url = make_url(str(self.engine.url))
        database = url.database or ""
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        return Path(database).with_name(Path(database).name + ".settlement.lock")

    async def acquire(self) -> bool:
        if self.held:
            return True
        if self.engine.dialect.name == "postgresql":
            connection = await self.engine.connect()
            try:
                got = (
                    await connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LEADER_LOCK_KEY})
                ).scalar_one()
                await connection.commit()
            except Exception:
                await connection.close()
                raise
            if not got:
                await connection.close()
                return False
            self._connection = connection
        else:
            path = self._lock_path()
            if path is not None:
                handle = _try_lock_file(path)
                if handle is None:
                    return False
                self._file = handle
        self.held = True
        return True

    async def check(self) -> bool:
        """Still the leader? (A dropped PostgreSQL connection loses the lock.)"""
        if self._connection is not None:
            try:
                await self._connection.execute(text("SELECT 1"))
                await self._connection.commit()
            except Exception:
                await self.release()
                return False
        return self.held

    async def release(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LEADER_LOCK_KEY})
                await self._connection.commit()
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        self.held = False


def _try_lock_file(path: Path) -> IO[str] | None:
    """An exclusive, non-blocking lock on `path` (created if needed); None if another holds it."""
    handle = path.open("a")  # held for the leader's lifetime
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


class SettlementWorker:
    def __init__(
        self,
        outbox: Outbox,
        client: EscrowClient,
        relayer: DirectRelayer,
        config: SettlementConfig | None = None,
        *,
        metrics: Metrics | None = None,
        start_block: int = 0,
        lock: LeaderLock | None = None,
        events: EscrowEvents | None = None,
    ) -> None:
        self.outbox = outbox
        self.client = client
        self.relayer = relayer
        self.config = config or SettlementConfig()
        self.metrics = metrics
        self.events = events or EscrowEvents(client, start_block)
        self.lock = lock
        self._reconcile_after: dict[str, tuple[float, int]] = {}
        self._failures: dict[int, int] = {}  # batch id -> RPC failures in a row (for the backoff)
        self._wake = asyncio.Event()

    # ---- the loop ---------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Settles while there is something to settle, polling every `poll`; with nothing, waits
        `idle` or until `wake()` (this replica captured a call), whichever comes first."""
        try:
            while not stop.is_set():
                if self.lock is None or (await self.lock.acquire() and await self.lock.check()):
                    busy = True
                    try:
                        busy = await self.outbox.has_work()
                        if busy:
                            await self.tick()
                    except Exception:
                        log.warning("settlement pass failed; retrying", exc_info=True)
                    # Busy, the next pass is `poll` away whatever is captured meanwhile; idle, a
                    # capture here starts it at once.
                    delay, wakeable = (self.config.poll, False) if busy else (self.config.idle, True)
                else:
                    # A follower: tries for leadership now and then.
                    delay, wakeable = max(1.0, self.config.poll * 4), False
                self._wake.clear()
                waits = [asyncio.ensure_future(stop.wait())]
                if wakeable:
                    waits.append(asyncio.ensure_future(self._wake.wait()))
                _, pending = await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
        finally:
            if self.lock is not None:
                await self.lock.release()

    async def tick(self) -> None:
        """One pass: follow submitted batches, form new ones, send what is due, reconcile."""
        await self._follow_submitted()
        await self._form_batches()
        await self._send_due()
        await self._follow_submitted()
        await self._reconcile_front_runs()

    def _backoff(self, attempts: int) -> float:
        return float(min(self.config.retry_max, self.config.retry_base * 2 ** max(0, attempts - 1)))

    async def _later(self, batch: BatchRow, error: str, attempts: int | None = None) -> None:
        delay = self._backoff(attempts if attempts is not None else batch.attempts)
        log.info("settlement retry", extra={"batch": batch.id, "error": error[:200], "in": delay})
        await self.outbox.retry_later(batch.id, error, utcnow() + timedelta(seconds=delay))

    # ---- forming ----------------------------------------------------------------------------------

    async def _form_batches(self) -> None:
        cfg = self.config
        count, oldest, expiry = await self.outbox.x402_backlog()
        now_ts = int(time.time())
        while count:
            due = (
                count >= cfg.batch_size
                or (oldest is not None and (utcnow() - oldest).total_seconds() >= cfg.max_age)
                or (expiry is not None and expiry <= now_ts + cfg.urgent_window)
            )
            if not due:
                break
            batch = await self.outbox.claim_x402_batch(cfg.batch_size, now_ts, cfg.min_validity)
            if batch is None:
                break
            count, oldest, expiry = await self.outbox.x402_backlog()
        for digest, oldest_charge in await self.outbox.charge_backlog():
            if (utcnow() - oldest_charge).total_seconds() >= cfg.max_age:
                await self.outbox.claim_charge_batch(digest, MAX_CHARGE_ROWS)

    # ---- sending ----------------------------------------------------------------------------------

    async def _send_due(self) -> None:
        now = utcnow()
        for batch in await self.outbox.batches(["pending"]):
            if batch.next_attempt_at is not None and batch.next_attempt_at > now:
                continue
            try:
                await self._send(batch)
                self._failures.pop(batch.id, None)
            except Exception as exc:  # RPC down, node hiccup: nothing known to be sent
                failures = self._failures[batch.id] = self._failures.get(batch.id, 0) + 1
                await self._later(batch, f"{type(exc).__name__}: {exc}", failures)

    async def _send(self, batch: BatchRow) -> None:
        if batch.attempts > 0 and await self._landed_already(batch):
            return
        if batch.kind == "x402":
            rows = await self._sendable_x402(batch)
            if not rows:
                await self.outbox.close_batch(batch.id, "confirmed")
                return
            call = self.client.encode_settle_authorizations([payment_args(r) for r in rows])
            await self.outbox.start_attempt(batch.id)
        else:
            assert batch.permission_digest is not None
            permission = await self.outbox.permission(batch.permission_digest)
            if permission is None:
                await self.outbox.fail_batch(batch.id, "the spend permission is not registered")
                return
            charges = await self.outbox.batch_charges(batch.id)
            args = PermissionArgs(
                consumer=permission.consumer,
                spender=permission.spender,
                allowance=permission.allowance,
                valid_after=permission.valid_after,
                valid_until=permission.valid_until,
                salt=int(permission.salt, 0),
                developer=permission.developer,
                max_markup_bps=permission.max_markup_bps,
            )
            settling = [c for c in charges if c.state == "settling"]
            packed = aggregate((c.provider, c.base) for c in settling)
            signature = bytes.fromhex(permission.signature.removeprefix("0x"))
            call = self.client.encode_settle_charges(
                args,
                signature,
                bytes.fromhex(batch.reference.removeprefix("0x")),
                packed,
                sum(c.markup for c in settling),
            )
            await self.outbox.start_attempt(batch.id)
        submission = await self.relayer.send(call, memo=batch.reference)
        if submission.state is TxState.REJECTED:
            # Refused before sending (it would revert): retried later, checked against the chain first.
            await self._later(batch, f"rejected: {submission.error}", batch.attempts + 1)
            return
        assert submission.tx_hash is not None
        await self.outbox.mark_submitted(batch.id, submission.id, submission.tx_hash)
        log.info(
            "settlement submitted", extra={"batch": batch.id, "tx": submission.tx_hash, "items": batch.items}
        )

    async def _sendable_x402(self, batch: BatchRow) -> list[X402Payment]:
        """The batch's payments still in time to settle, listed provider by provider (the escrow
        books each provider's run of payments once)."""
        now_ts = int(time.time())
        rows = []
        for row in await self.outbox.batch_x402(batch.id):
            if row.valid_before <= now_ts + self.config.min_validity:
                await self.outbox.fail_x402(row.call_id, "expired before settlement", payer_fault=False)
                self._count("x402", "failed")
            else:
                rows.append(row)
        return rows

    # ---- was it on-chain already? -----------------------------------------------------------------

    async def _landed_already(self, batch: BatchRow) -> bool:
        """Records whatever of a previously attempted batch the chain already credited; True when
        nothing of it is left to send."""
        if batch.kind == "x402":
            block = await self.client.block_number()
            for row in await self.outbox.batch_x402(batch.id):
                if await self.client.authorization_used(row.payer, row.nonce_bytes, block):
                    await self._resolve_used(row, block)
            if not await self.outbox.batch_x402(batch.id):
                await self.outbox.close_batch(batch.id, "confirmed")
                return True
            return False
        assert batch.permission_digest is not None
        if not await self.client.reference_settled(bytes.fromhex(batch.reference.removeprefix("0x"))):
            return False
        event = await self.events.charges_of(batch.permission_digest, batch.reference)
        if event is None:
            raise RelayerError(f"batch {batch.id} settled, but its ChargesSettled is not found yet")
        await self._charges_landed(batch, event, gas_used=None)
        return True

    async def _resolve_used(self, row: X402Payment, block: int) -> None:
        """USDC marks the authorization used (as of `block`): credited by the escrow earlier, or
        front-run (or cancelled by its payer)."""
        credit = await self.events.credit_of(row.payer, row.nonce)
        if credit is not None:
            if await self.outbox.settle_x402(
                row.call_id,
                tx_hash=credit.tx_hash,
                fee=credit.fee,
                block=credit.block,
                reconciled=credit.kind == "reconciled",
            ):
                self._count("x402", "settled")
            return
        if await self.outbox.mark_reconciling(row.call_id, FRONT_RUN, block=block):
            log.warning("x402 authorization front-run; reconciling", extra={"call": row.call_id})

    # ---- following transactions -------------------------------------------------------------------

    async def _follow_submitted(self) -> None:
        for batch in await self.outbox.batches(["submitted"]):
            try:
                await self._follow(batch)
            except Exception:
                log.info("settlement status check failed; retrying", extra={"batch": batch.id}, exc_info=True)

    async def _follow(self, batch: BatchRow) -> None:
        assert batch.tx_hash is not None
        tx_hash = batch.tx_hash
        receipt = None
        if batch.submission_id is not None:
            try:
                sub: Submission | None = await self.relayer.status(batch.submission_id)
            except RelayerError:
                sub = None  # sent by an earlier process: follow the hash
            if sub is not None:
                if not sub.state.final:
                    return
                tx_hash = sub.tx_hash or tx_hash
                receipt = sub.receipt
        if receipt is None:
            receipt = await self.client.reads.receipt(tx_hash)
            if receipt is None:
                if (utcnow() - batch.updated_at).total_seconds() > self.config.stuck_after:
                    await self._later(batch, "transaction not found", batch.attempts)
                return
        if receipt["status"] != 1:
            await self._later(batch, f"reverted in {tx_hash}", batch.attempts)
            return
        gas_used = int(receipt["gasUsed"])
        events = self.events.from_receipt(receipt)
        if batch.kind == "x402":
            await self._x402_landed(batch, tx_hash, receipt, events, gas_used)
        else:
            found = [e for e in events if e.name == "ChargesSettled"]
            if not found:
                await self._later(batch, f"no ChargesSettled in {tx_hash}", batch.attempts)
                return
            await self._charges_landed(batch, found[0], gas_used=gas_used)

    async def _x402_landed(
        self, batch: BatchRow, tx_hash: str, receipt: Any, events: list[EscrowEvent], gas_used: int
    ) -> None:
        settled = {c.key: c for c in await self.events.credits_in(tx_hash, receipt) if c.kind == "settled"}
        failed = {e.key for e in events if e.name == "PaymentFailed"}
        block = int(receipt["blockNumber"])
        rows = await self.outbox.batch_x402(batch.id)
        fees = {
            r.call_id: settled[(r.payer, r.nonce.lower())].fee
            for r in rows
            if (r.payer, r.nonce.lower()) in settled
        }
        self._count(
            "x402", "settled", await self.outbox.settle_x402_batch(fees, tx_hash=tx_hash, block=block)
        )
        for row in rows:
            key = (row.payer, row.nonce.lower())
            if key in settled:
                continue
            if key in failed and await self.client.authorization_used(row.payer, row.nonce_bytes, block):
                await self._resolve_used(row, block)
            elif key in failed:
                await self.outbox.fail_x402(
                    row.call_id, f"USDC refused the authorization in {tx_hash}", payer_fault=True
                )
                self._count("x402", "failed")
            else:
                await self.outbox.release_x402(row.call_id, f"not in {tx_hash}")
        await self.outbox.close_batch(batch.id, "confirmed", tx_hash=tx_hash, gas_used=gas_used)
        log.info("settlement confirmed", extra={"batch": batch.id, "tx": tx_hash, "gas": gas_used})

    async def _charges_landed(self, batch: BatchRow, event: EscrowEvent, *, gas_used: int | None) -> None:
        if await self.outbox.settle_charges(
            batch,
            tx_hash=event.tx_hash,
            gas_used=gas_used,
            fee_bps=int(event.args["fee_bps"]),
            total_fee=int(event.args["fee"]),
        ):
            self._count("charges", "settled", batch.items)
            log.info("charges settled", extra={"batch": batch.id, "tx": event.tx_hash})

    # ---- front-run authorizations -----------------------------------------------------------------

    async def _reconcile_front_runs(self) -> None:
        now = time.monotonic()
        for row in await self.outbox.x402_in(["reconciling"], limit=64):
            after, tries = self._reconcile_after.get(row.call_id, (0.0, 0))
            if after > now:
                continue
            try:
                await self._reconcile(row)
                self._reconcile_after.pop(row.call_id, None)
            except Exception as exc:
                log.info("reconcile failed; retrying", extra={"call": row.call_id, "error": str(exc)})
                self._reconcile_after[row.call_id] = (now + self._backoff(tries + 1), tries + 1)

    async def _reconcile(self, row: X402Payment) -> None:
        credit = await self.events.credit_of(row.payer, row.nonce)
        if credit is None:
            await self._allow_reconcile(row.amount)
            call = self.client.encode_reconcile_authorization(payment_args(row))
            submission = await self.relayer.send(call, memo=row.call_id)
            if submission.state is TxState.REJECTED:
                raise RelayerError(f"reconcile rejected: {submission.error}")
            final = await wait_final(self.relayer, submission.id, within=self.config.confirm_within)
            if final.state is not TxState.CONFIRMED or final.tx_hash is None:
                raise RelayerError(f"reconcile not confirmed: {final.state.name}")
            found = [c for c in await self.events.credits_in(final.tx_hash) if c.kind == "reconciled"]
            if not found:
                raise RelayerError(f"no PaymentReconciled in {final.tx_hash}")
            credit = found[0]
        if await self.outbox.settle_x402(
            row.call_id,
            tx_hash=credit.tx_hash,
            fee=credit.fee,
            block=credit.block,
            reconciled=credit.kind == "reconciled",
        ):
            self._count("x402", "reconciled")
            log.info("x402 front-run reconciled", extra={"call": row.call_id, "tx": credit.tx_hash})

    async def _allow_reconcile(self, amount: int) -> None:
        """A reconcile is paid with the operator's own USDC (the escrow never credits funds it did
        not receive itself): approve the escrow to take it, once, when the allowance runs short."""
        operator = self.relayer.address
        if await self.client.usdc_allowance(operator, self.client.escrow_address) >= amount:
            return
        submission = await self.relayer.send(
            self.client.encode_usdc_approve(self.client.escrow_address, 2**256 - 1), memo="approve reconciles"
        )
        final = await wait_final(self.relayer, submission.id, within=self.config.confirm_within)
        if final.state is not TxState.CONFIRMED:
            raise RelayerError(f"approving the escrow for reconciles: {final.state.name} {final.error or ''}")

    # ---- refunds ----------------------------------------------------------------------------------

    async def refund(self, call_id: str) -> str:
        """Refunds a settled x402 call's payment to its payer through the escrow's `refund_payment`
        (out of the provider's unclaimed share and the fee, proven by its credit's leaf and root).
        Returns the transaction hash."""
        row = await self.outbox.get_x402(call_id)
        if row is None or row.state != "settled":
            raise RelayerError(f"{call_id} is not a settled x402 call: nothing to refund")
        credit = await self.events.credit_of(row.payer, row.nonce)
        if credit is None or credit.root is None:
            raise RelayerError(f"{call_id}: its credit is not found on-chain")
        submission = await self.relayer.send(
            self.client.encode_refund_payment(credit.leaf(), credit.root, list(credit.proof)),
            memo=f"refund {call_id}",
        )
        if submission.state is TxState.REJECTED:
            raise RelayerError(f"refund rejected: {submission.error}")
        final = await wait_final(self.relayer, submission.id, within=self.config.confirm_within)
        if final.state is not TxState.CONFIRMED or final.tx_hash is None:
            raise RelayerError(f"refund not confirmed: {final.state.name}")
        await self.outbox.refund_x402(row.call_id)
        self._count("x402", "refunded")
        return final.tx_hash

    # ---- helpers ----------------------------------------------------------------------------------

    def _count(self, kind: str, outcome: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.settlements.labels(kind, outcome).inc(n)


def payment_args(row: X402Payment) -> PaymentArgs:
    """The escrow's `Payment` struct for an x402 call: its authorization, and what it charges of
    it (the escrow credits the rest to the payer's deposit)."""
    return PaymentArgs(
        payer=row.payer,
        provider=row.provider,
        amount=row.value,
        charged=row.amount,
        valid_after=row.valid_after,
        valid_before=row.valid_before,
        nonce=row.nonce_bytes,
        signature=eip712.Signature.from_bytes(row.signature),
    )
