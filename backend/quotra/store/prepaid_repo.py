"""Prepaid accounts, API keys and charges: every statement of the API-key payment path.

Each money movement is one short transaction of conditional UPDATEs (atomic on SQLite and
PostgreSQL alike) plus its `prepaid_charges` row and its ledger entry, so a budget can never be
overspent however many calls race for it.

Contract with the settlement worker (`quotra.payments.settlement`) and the indexer
-------------------------------------------------------------------------------------
- This module writes `prepaid_charges`. A row is `reserved` while its call runs (its
  `reserved_amount` is counted in `consumer_accounts.reserved` and `api_keys.reserved`), then ends
  `captured` (live keys, `0 < amount <= reserved_amount`), `released` (failed call, or a call
  that cost nothing) or `metered` (sandbox keys: counted against the key only, never settled;
  `permission_digest` is empty). This module never touches a row after that.
- `captured` rows are the settlement outbox and are already counted in
  `consumer_accounts.unsettled`. The worker groups them by (consumer, permission_digest), moves
  them to `settling` (setting `batch_id`), and when the `settle_charges` transaction is confirmed
  moves them to `settled` and, in the same transaction: `unsettled -= sum(amount)`, `deposit -=
  sum(amount)`, and `permission_spent += sum(amount)` only `WHERE permission_digest = <batch's>`
  (the account may have switched to a newer permission meanwhile). A batch that fails for good
  ends its rows `failed` and also takes their sum off `unsettled`. The usage listing shows a
  settled row's transaction through `settlement_batches.tx_hash`.
- The mirror columns `deposit`, `pending_withdrawal` and `permission_spent` are written from the
  chain by `sync_account` as a compare-and-set against the values read before the chain call:
  if the worker (or the indexer) changed them meanwhile, the fresher database values win and the
  next refresh catches up. Between a settlement landing and the worker applying it the settled
  amount is counted twice (in `unsettled` and on-chain), which only ever errs on the safe side.
- Ledger: `reserve`, `capture` and `release` (method `prepaid`, reference `prepaid_<id>` like the
  worker's `settle` entries) for live keys; `deposit` (method `chain`, reference
  `deposit:<nonce>`, with `tx_hash`) for gasless deposits this relay submitted; an indexer
  recording `Deposited` events should skip tx hashes already in the ledger.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import exists, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from quotra.store import ledger
from quotra.store.models import (
    ApiKeyRecord,
    ConsumerAccount,
    PrepaidCharge,
    SettlementBatch,
    SpendPermissionRecord,
    utcnow,
)
from quotra.store.repositories import Store

KeyMode = Literal["live", "sandbox"]
Shortfall = Literal["key_revoked", "key_cap", "no_permission", "permission", "deposit"]


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRef:
    """What the hot path needs of an API key (cached briefly by the service)."""

    id: str
    wallet: str
    mode: KeyMode

    @property
    def live(self) -> bool:
        return self.mode == "live"


@dataclass(frozen=True)
class ApiKeyView:
    id: str
    wallet: str
    name: str
    mode: KeyMode
    spend_cap: int | None
    spent: int
    reserved: int
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, row: ApiKeyRecord) -> ApiKeyView:
        return cls(
            row.id,
            row.wallet,
            row.name,
            "sandbox" if row.mode == "sandbox" else "live",
            row.spend_cap,
            row.spent,
            row.reserved,
            row.revoked_at,
            row.last_used_at,
            row.created_at,
        )

    @property
    def remaining(self) -> int | None:
        return None if self.spend_cap is None else max(0, self.spend_cap - self.spent - self.reserved)


@dataclass(frozen=True)
class PermissionView:
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
    def of(cls, row: SpendPermissionRecord) -> PermissionView:
        return cls(
            row.digest,
            row.consumer,
            row.spender,
            row.allowance,
            row.valid_after,
            row.valid_until,
            row.salt,
            row.signature,
            row.revoked_at,
        )


@dataclass(frozen=True)
class AccountView:
    """The prepaid position of a wallet; see `ConsumerAccount` for the accounting."""

    wallet: str
    deposit: int
    pending_withdrawal: int
    permission_digest: str | None
    permission_allowance: int
    permission_spent: int
    reserved: int
    unsettled: int
    synced_at: datetime | None

    @classmethod
    def of(cls, row: ConsumerAccount) -> AccountView:
        return cls(
            row.wallet,
            row.deposit,
            row.pending_withdrawal,
            row.permission_digest,
            row.permission_allowance,
            row.permission_spent,
            row.reserved,
            row.unsettled,
            row.synced_at,
        )

    @classmethod
    def empty(cls, wallet: str) -> AccountView:
        return cls(wallet, 0, 0, None, 0, 0, 0, 0, None)

    @property
    def deposit_available(self) -> int:
        return self.deposit - self.pending_withdrawal - self.unsettled - self.reserved

    @property
    def permission_remaining(self) -> int:
        if self.permission_digest is None:
            return 0
        return self.permission_allowance - self.permission_spent - self.unsettled - self.reserved

    @property
    def available(self) -> int:
        return max(0, min(self.deposit_available, self.permission_remaining))


@dataclass(frozen=True)
class Reservation:
    charge_id: int
    key: KeyRef
    amount: int
    listing_id: str
    provider: str


@dataclass(frozen=True)
class UsageRow:
    id: int
    api_key_id: str
    listing_id: str
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    reserved_amount: int
    amount: int
    status: str
    tx_hash: str | None
    created_at: datetime


class Refused(Exception):
    """A reservation was refused; `shortfall` names the first limit that is too low."""

    def __init__(self, shortfall: Shortfall) -> None:
        super().__init__(shortfall)
        self.shortfall = shortfall


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


class PrepaidStore:
    def __init__(self, store: Store) -> None:
        self.sessions = store.sessions
        self.dialect = store.dialect

    def _insert_ignore(self, model: Any, values: dict[str, Any]) -> Any:
        if self.dialect == "postgresql":
            return pg_insert(model).values(**values).on_conflict_do_nothing()
        if self.dialect == "sqlite":
            return sqlite_insert(model).values(**values).on_conflict_do_nothing()
        return insert(model).values(**values).prefix_with("IGNORE")

    # ---- API keys ------------------------------------------------------------------------------

    async def create_key(
        self, *, key_id: str, secret_hash: str, wallet: str, name: str, mode: KeyMode, spend_cap: int | None
    ) -> ApiKeyView:
        async with self.sessions.begin() as session:
            row = ApiKeyRecord(
                id=key_id,
                key_hash=secret_hash,
                wallet=wallet,
                name=name,
                mode=mode,
                spend_cap=spend_cap,
                spent=0,
                reserved=0,
                created_at=utcnow(),
            )
            session.add(row)
            await session.flush()
            return ApiKeyView.of(row)

    async def key_by_hash(self, secret_hash: str) -> KeyRef | None:
        """The key, unless unknown or revoked."""
        query = select(ApiKeyRecord.id, ApiKeyRecord.wallet, ApiKeyRecord.mode).where(
            ApiKeyRecord.key_hash == secret_hash, ApiKeyRecord.revoked_at.is_(None)
        )
        async with self.sessions() as session:
            row = (await session.execute(query)).first()
        if row is None:
            return None
        return KeyRef(row.id, row.wallet, "sandbox" if row.mode == "sandbox" else "live")

    async def list_keys(self, wallet: str) -> list[ApiKeyView]:
        query = (
            select(ApiKeyRecord)
            .where(ApiKeyRecord.wallet == wallet)
            .order_by(ApiKeyRecord.created_at.desc(), ApiKeyRecord.id)
        )
        async with self.sessions() as session:
            return [ApiKeyView.of(r) for r in (await session.scalars(query)).all()]

    async def count_active_keys(self, wallet: str) -> int:
        query = (
            select(func.count())
            .select_from(ApiKeyRecord)
            .where(ApiKeyRecord.wallet == wallet, ApiKeyRecord.revoked_at.is_(None))
        )
        async with self.sessions() as session:
            return int((await session.execute(query)).scalar_one())

    async def revoke_key(
        self, wallet: str, key_id: str, now: datetime | None = None
    ) -> tuple[ApiKeyView, str]:
        """Revokes one of `wallet`'s keys (idempotent); returns it and its hash. KeyError if not theirs."""
        async with self.sessions.begin() as session:
            row = await session.get(ApiKeyRecord, key_id, with_for_update=True)
            if row is None or row.wallet != wallet:
                raise KeyError(key_id)
            if row.revoked_at is None:
                row.revoked_at = now or utcnow()
            await session.flush()
            return ApiKeyView.of(row), row.key_hash

    async def update_key(self, wallet: str, key_id: str, **values: Any) -> ApiKeyView:
        """Changes `name` and/or `spend_cap` of one of `wallet`'s keys. KeyError if not theirs."""
        unknown = set(values) - {"name", "spend_cap"}
        if unknown:
            raise TypeError(f"unknown key fields {sorted(unknown)}")
        async with self.sessions.begin() as session:
            row = await session.get(ApiKeyRecord, key_id, with_for_update=True)
            if row is None or row.wallet != wallet:
                raise KeyError(key_id)
            for name, value in values.items():
                setattr(row, name, value)
            await session.flush()
            return ApiKeyView.of(row)

    # ---- the hot path: reserve, capture, release -----------------------------------------------

    async def reserve(
        self,
        key: KeyRef,
        *,
        listing_id: str,
        provider: str,
        amount: int,
        now_ts: int,
        margin: int,
    ) -> Reservation:
        """Reserves `amount` against the key's cap and (live keys) the account's deposit and active
        permission, all or nothing. Raises `Refused` naming the limit that is short."""
        if amount <= 0:
            raise ValueError("a reservation must be positive")
        now = utcnow()
        try:
            async with self.sessions.begin() as session:
                digest = ""
                if key.live:
                    digest = await self._reserve_account(session, key.wallet, amount, now_ts, margin)
                taken = await session.execute(
                    update(ApiKeyRecord)
                    .where(
                        ApiKeyRecord.id == key.id,
                        ApiKeyRecord.revoked_at.is_(None),
                        or_(
                            ApiKeyRecord.spend_cap.is_(None),
                            ApiKeyRecord.spend_cap - ApiKeyRecord.spent - ApiKeyRecord.reserved >= amount,
                        ),
                    )
                    .values(reserved=ApiKeyRecord.reserved + amount, last_used_at=now)
                    .execution_options(synchronize_session=False)
                )
                if _rowcount(taken) != 1:
                    raise Refused("key_cap")
                charge_id = (
                    await session.execute(
                        insert(PrepaidCharge)
                        .values(
                            consumer=key.wallet,
                            api_key_id=key.id,
                            permission_digest=digest,
                            listing_id=listing_id,
                            provider=provider,
                            reserved_amount=amount,
                            amount=0,
                            prompt_tokens=0,
                            completion_tokens=0,
                            model="",
                            status="reserved",
                            created_at=now,
                            updated_at=now,
                        )
                        .returning(PrepaidCharge.id)
                    )
                ).scalar_one()
                if key.live:
                    await ledger.append(
                        session,
                        kind="reserve",
                        method="prepaid",
                        account=key.wallet,
                        amount=amount,
                        provider=provider,
                        listing_id=listing_id,
                        reference=f"prepaid_{charge_id}",
                    )
        except Refused as refused:
            raise Refused(await self._diagnose(key, now_ts, margin, refused.shortfall)) from None
        return Reservation(int(charge_id), key, amount, listing_id, provider)

    async def _reserve_account(
        self, session: AsyncSession, wallet: str, amount: int, now_ts: int, margin: int
    ) -> str:
        account = ConsumerAccount
        permission = SpendPermissionRecord
        usable = exists().where(
            permission.digest == account.permission_digest,
            permission.revoked_at.is_(None),
            permission.valid_after <= now_ts,
            permission.valid_until > now_ts + margin,
        )
        result = await session.execute(
            update(account)
            .where(
                account.wallet == wallet,
                account.permission_digest.is_not(None),
                usable,
                account.deposit - account.pending_withdrawal - account.unsettled - account.reserved >= amount,
                account.permission_allowance - account.permission_spent - account.unsettled - account.reserved
                >= amount,
            )
            .values(reserved=account.reserved + amount)
            .returning(account.permission_digest)
            .execution_options(synchronize_session=False)
        )
        digest = result.scalar_one_or_none()
        if digest is None:
            raise Refused("deposit")  # refined by _diagnose
        return str(digest)

    async def _diagnose(self, key: KeyRef, now_ts: int, margin: int, where: Shortfall) -> Shortfall:
        """Which limit refused a reservation (read after the fact; only for the error message)."""
        async with self.sessions() as session:
            row = await session.get(ApiKeyRecord, key.id)
            if row is None or row.revoked_at is not None:
                return "key_revoked"
            if where == "key_cap":
                return "key_cap"
            account_row = await session.get(ConsumerAccount, key.wallet)
            if account_row is None or account_row.permission_digest is None:
                return "no_permission"
            permission = await session.get(SpendPermissionRecord, account_row.permission_digest)
        if (
            permission is None
            or permission.revoked_at is not None
            or not permission.valid_after <= now_ts < permission.valid_until - margin
        ):
            return "no_permission"
        view = AccountView.of(account_row)  # the tighter of the two is the one to raise
        return "permission" if view.permission_remaining <= view.deposit_available else "deposit"

    async def capture(
        self,
        reservation: Reservation,
        cost: int,
        *,
        model: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> int:
        """Finalises a served call at `min(cost, reserved)`; returns the amount charged (0 if the
        reservation was already finalised, e.g. swept)."""
        amount = max(0, min(cost, reservation.amount))
        key = reservation.key
        status = ("captured" if amount > 0 else "released") if key.live else "metered"
        async with self.sessions.begin() as session:
            if not await self._finish(
                session, reservation, status, amount, model, prompt_tokens, completion_tokens
            ):
                return 0
            if key.live:
                await session.execute(
                    update(ConsumerAccount)
                    .where(ConsumerAccount.wallet == key.wallet)
                    .values(
                        reserved=ConsumerAccount.reserved - reservation.amount,
                        unsettled=ConsumerAccount.unsettled + (amount if status == "captured" else 0),
                    )
                    .execution_options(synchronize_session=False)
                )
            await session.execute(
                update(ApiKeyRecord)
                .where(ApiKeyRecord.id == key.id)
                .values(
                    reserved=ApiKeyRecord.reserved - reservation.amount, spent=ApiKeyRecord.spent + amount
                )
                .execution_options(synchronize_session=False)
            )
            if key.live:
                await ledger.append(
                    session,
                    kind="capture" if status == "captured" else "release",
                    method="prepaid",
                    account=key.wallet,
                    amount=amount if status == "captured" else reservation.amount,
                    provider=reservation.provider,
                    listing_id=reservation.listing_id,
                    reference=f"prepaid_{reservation.charge_id}",
                )
        return amount

    async def release(self, reservation: Reservation) -> bool:
        """Gives a reservation back in full (the call failed); False if already finalised."""
        key = reservation.key
        async with self.sessions.begin() as session:
            if not await self._finish(session, reservation, "released", 0, None, 0, 0):
                return False
            if key.live:
                await session.execute(
                    update(ConsumerAccount)
                    .where(ConsumerAccount.wallet == key.wallet)
                    .values(reserved=ConsumerAccount.reserved - reservation.amount)
                    .execution_options(synchronize_session=False)
                )
            await session.execute(
                update(ApiKeyRecord)
                .where(ApiKeyRecord.id == key.id)
                .values(reserved=ApiKeyRecord.reserved - reservation.amount)
                .execution_options(synchronize_session=False)
            )
            if key.live:
                await ledger.append(
                    session,
                    kind="release",
                    method="prepaid",
                    account=key.wallet,
                    amount=reservation.amount,
                    provider=reservation.provider,
                    listing_id=reservation.listing_id,
                    reference=f"prepaid_{reservation.charge_id}",
                )
        return True

    async def _finish(
        self,
        session: AsyncSession,
        reservation: Reservation,
        status: str,
        amount: int,
        model: str | None,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> bool:
        values: dict[str, Any] = {"status": status, "amount": amount, "updated_at": utcnow()}
        if model is not None:
            values.update(model=model[:200], prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        result = await session.execute(
            update(PrepaidCharge)
            .where(PrepaidCharge.id == reservation.charge_id, PrepaidCharge.status == "reserved")
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return _rowcount(result) == 1

    async def stale_reservations(self, older_than: datetime, limit: int = 500) -> list[Reservation]:
        """Reservations left open by a crashed or stuck call (the sweeper releases them)."""
        query = (
            select(PrepaidCharge, ApiKeyRecord.mode)
            .join(ApiKeyRecord, ApiKeyRecord.id == PrepaidCharge.api_key_id)
            .where(PrepaidCharge.status == "reserved", PrepaidCharge.created_at < older_than)
            .order_by(PrepaidCharge.id)
            .limit(limit)
        )
        async with self.sessions() as session:
            rows = (await session.execute(query)).all()
        return [
            Reservation(
                charge.id,
                KeyRef(charge.api_key_id, charge.consumer, "sandbox" if mode == "sandbox" else "live"),
                charge.reserved_amount,
                charge.listing_id,
                charge.provider,
            )
            for charge, mode in rows
        ]

    # ---- accounts and permissions ----------------------------------------------------------------

    async def get_account(self, wallet: str) -> AccountView | None:
        async with self.sessions() as session:
            row = await session.get(ConsumerAccount, wallet)
            return None if row is None else AccountView.of(row)

    async def ensure_account(self, wallet: str) -> None:
        async with self.sessions.begin() as session:
            await session.execute(
                self._insert_ignore(
                    ConsumerAccount,
                    {
                        "wallet": wallet,
                        "deposit": 0,
                        "pending_withdrawal": 0,
                        "permission_allowance": 0,
                        "permission_spent": 0,
                        "reserved": 0,
                        "unsettled": 0,
                        "created_at": utcnow(),
                    },
                )
            )

    async def sync_account(
        self,
        wallet: str,
        *,
        seen: AccountView,
        deposit: int,
        pending_withdrawal: int,
        permission_spent: int | None,
    ) -> bool:
        """Writes chain values read after `seen` was loaded, unless deposit, permission or its
        spent amount changed in the database meanwhile (then those fresher values stand)."""
        values: dict[str, Any] = {
            "deposit": deposit,
            "pending_withdrawal": pending_withdrawal,
            "synced_at": utcnow(),
        }
        if permission_spent is not None:
            values["permission_spent"] = permission_spent
        digest_unchanged = (
            ConsumerAccount.permission_digest.is_(None)
            if seen.permission_digest is None
            else ConsumerAccount.permission_digest == seen.permission_digest
        )
        async with self.sessions.begin() as session:
            result = await session.execute(
                update(ConsumerAccount)
                .where(
                    ConsumerAccount.wallet == wallet,
                    ConsumerAccount.deposit == seen.deposit,
                    ConsumerAccount.permission_spent == seen.permission_spent,
                    digest_unchanged,
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        return _rowcount(result) == 1

    async def wallets_to_refresh(self, limit: int) -> list[str]:
        """Accounts with an active permission, least recently synced first."""
        query = (
            select(ConsumerAccount.wallet)
            .where(ConsumerAccount.permission_digest.is_not(None))
            .order_by(ConsumerAccount.synced_at.asc().nulls_first(), ConsumerAccount.wallet)
            .limit(limit)
        )
        async with self.sessions() as session:
            return list((await session.scalars(query)).all())

    async def activate_permission(self, permission: PermissionView, spent: int) -> None:
        """Stores a verified permission and makes it the account's active one."""
        async with self.sessions.begin() as session:
            await session.execute(
                self._insert_ignore(
                    SpendPermissionRecord,
                    {
                        "digest": permission.digest,
                        "consumer": permission.consumer,
                        "spender": permission.spender,
                        "allowance": permission.allowance,
                        "valid_after": permission.valid_after,
                        "valid_until": permission.valid_until,
                        "salt": permission.salt,
                        "signature": permission.signature,
                        "created_at": utcnow(),
                    },
                )
            )
            await session.execute(
                self._insert_ignore(
                    ConsumerAccount,
                    {
                        "wallet": permission.consumer,
                        "deposit": 0,
                        "pending_withdrawal": 0,
                        "permission_allowance": 0,
                        "permission_spent": 0,
                        "reserved": 0,
                        "unsettled": 0,
                        "created_at": utcnow(),
                    },
                )
            )
            await session.execute(
                update(ConsumerAccount)
                .where(ConsumerAccount.wallet == permission.consumer)
                .values(
                    permission_digest=permission.digest,
                    permission_allowance=permission.allowance,
                    permission_spent=spent,
                )
                .execution_options(synchronize_session=False)
            )

    async def get_permission(self, digest: str) -> PermissionView | None:
        async with self.sessions() as session:
            row = await session.get(SpendPermissionRecord, digest)
            return None if row is None else PermissionView.of(row)

    async def mark_permission_revoked(self, digest: str, now: datetime | None = None) -> None:
        async with self.sessions.begin() as session:
            await session.execute(
                update(SpendPermissionRecord)
                .where(SpendPermissionRecord.digest == digest, SpendPermissionRecord.revoked_at.is_(None))
                .values(revoked_at=now or utcnow())
                .execution_options(synchronize_session=False)
            )

    # ---- history ---------------------------------------------------------------------------------

    async def settled_total(self, wallet: str) -> int:
        query = select(func.coalesce(func.sum(PrepaidCharge.amount), 0)).where(
            PrepaidCharge.consumer == wallet, PrepaidCharge.status == "settled"
        )
        async with self.sessions() as session:
            return int((await session.execute(query)).scalar_one())

    async def usage(self, wallet: str, *, limit: int, before: int | None = None) -> list[UsageRow]:
        """The wallet's calls, newest first; `before` is the id the previous page ended with."""
        query = (
            select(PrepaidCharge, SettlementBatch.tx_hash, SettlementBatch.status)
            .outerjoin(SettlementBatch, SettlementBatch.id == PrepaidCharge.batch_id)
            .where(PrepaidCharge.consumer == wallet)
            .order_by(PrepaidCharge.id.desc())
            .limit(limit)
        )
        if before is not None:
            query = query.where(PrepaidCharge.id < before)
        async with self.sessions() as session:
            rows = (await session.execute(query)).all()
        return [
            UsageRow(
                charge.id,
                charge.api_key_id,
                charge.listing_id,
                charge.provider,
                charge.model,
                charge.prompt_tokens,
                charge.completion_tokens,
                charge.reserved_amount,
                charge.amount,
                charge.status,
                tx_hash if charge.status == "settled" or batch_status == "confirmed" else None,
                charge.created_at,
            )
            for charge, tx_hash, batch_status in rows
        ]

    async def record_deposit(self, wallet: str, amount: int, *, nonce: str, tx_hash: str) -> None:
        async with self.sessions.begin() as session:
            await ledger.append(
                session,
                kind="deposit",
                method="chain",
                account=wallet,
                amount=amount,
                reference=f"deposit:{nonce}",
                tx_hash=tx_hash,
            )
