"""Prepaid accounts, API keys and spend permissions: the wallet side of the API-key payment path.

A keyed call is reserved, finished and voided by the call store (`quotra.calls.store`), which moves
`consumer_accounts.reserved` / `unsettled` and `api_keys.reserved` / `spent` in the same
transaction as the call's row; the settlement outbox (`quotra.calls.outbox`) moves a settled
batch's sum from `unsettled` to the mirrored `deposit` and `permission_spent`. This module keeps the
accounts' chain mirror, the keys and the permissions.

The mirror columns `deposit`, `pending_withdrawal` and `permission_spent` are written from the
chain by `sync_account` as a compare-and-set against the values read before the chain call: if
settlement changed them meanwhile, the fresher database values win and the next refresh catches
up. Between a settlement landing and the worker applying it the settled amount is counted twice
(in `unsettled` and on-chain), which only ever errs on the safe side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import func, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

from quotra.store.models import (
    ZERO_ADDRESS,
    ApiKeyRecord,
    App,
    AppUser,
    Call,
    ConsumerAccount,
    SpendPermissionRecord,
    table,
    utcnow,
)
from quotra.store.repositories import Store
from quotra.store.sql import insert_ignore, record
from quotra.store.transactions import Transactions

KeyMode = Literal["live", "sandbox"]
Shortfall = Literal["key_revoked", "key_cap", "no_permission", "markup", "permission", "deposit"]


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRef:
    """What the hot path needs of an API key (cached briefly by the service): an app's key also
    carries its app and the app's markup."""

    id: str
    wallet: str
    mode: KeyMode
    app_id: str | None = None
    markup_bps: int = 0
    rate_per_minute: int | None = None  # None: the relay's default for keys

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
    app_id: str | None = None
    rate_per_minute: int | None = None

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
            row.app_id,
            row.rate_per_minute,
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
    developer: str = ZERO_ADDRESS  # the app developer its charges may pay a markup (none)…
    max_markup_bps: int = 0  # …and the most, in basis points of the base cost
    spent: int = 0  # its budget (kept for a permission connected to an app)
    reserved: int = 0
    unsettled: int = 0

    @classmethod
    def of(cls, row: SpendPermissionRecord) -> PermissionView:
        return record(cls, row)

    @property
    def remaining(self) -> int:
        """What a permission connected to an app may still reserve."""
        return self.allowance - self.spent - self.unsettled - self.reserved


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
        return record(cls, row)

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


def _rows_changed(connection: Connection, statement: Any) -> int:
    return int(connection.execute(statement).rowcount)


async def store_permission(
    session: AsyncSession, dialect: str, permission: PermissionView, spent: int
) -> None:
    """Stores a verified permission (kept as it is if known) and makes sure its consumer has an
    account, whose deposit its calls reserve."""
    await session.execute(
        insert_ignore(
            dialect,
            table(SpendPermissionRecord),
            {
                "digest": permission.digest,
                "consumer": permission.consumer,
                "spender": permission.spender,
                "allowance": permission.allowance,
                "valid_after": permission.valid_after,
                "valid_until": permission.valid_until,
                "salt": permission.salt,
                "developer": permission.developer,
                "max_markup_bps": permission.max_markup_bps,
                "signature": permission.signature,
                "spent": spent,
                "created_at": utcnow(),
            },
        )
    )
    await session.execute(insert_ignore(dialect, table(ConsumerAccount), _new_account(permission.consumer)))


def _new_account(wallet: str) -> dict[str, Any]:
    return {
        "wallet": wallet,
        "deposit": 0,
        "pending_withdrawal": 0,
        "permission_allowance": 0,
        "permission_spent": 0,
        "reserved": 0,
        "unsettled": 0,
        "created_at": utcnow(),
    }


class PrepaidStore:
    """The chain mirror's writes (`ensure_account`, `sync_account`, `mark_permission_revoked`),
    which a background refresh makes while calls are being served, go through `transactions`: on
    SQLite its one writer thread, so they never contend with the calls' writes for the lock."""

    def __init__(self, store: Store, transactions: Transactions) -> None:
        self.sessions = store.sessions
        self.dialect = store.dialect
        self.transactions = transactions

    # ---- API keys ------------------------------------------------------------------------------

    async def create_key(
        self,
        *,
        key_id: str,
        secret_hash: str,
        wallet: str,
        name: str,
        mode: KeyMode,
        spend_cap: int | None,
        app_id: str | None = None,
        rate_per_minute: int | None = None,
    ) -> ApiKeyView:
        async with self.sessions.begin() as session:
            row = ApiKeyRecord(
                id=key_id,
                key_hash=secret_hash,
                wallet=wallet,
                app_id=app_id,
                rate_per_minute=rate_per_minute,
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
        """The key (with its app's markup), unless unknown or revoked."""
        query = (
            select(
                ApiKeyRecord.id,
                ApiKeyRecord.wallet,
                ApiKeyRecord.mode,
                ApiKeyRecord.app_id,
                ApiKeyRecord.rate_per_minute,
                App.markup_bps,
            )
            .outerjoin(App, App.id == ApiKeyRecord.app_id)
            .where(ApiKeyRecord.key_hash == secret_hash, ApiKeyRecord.revoked_at.is_(None))
        )
        async with self.sessions() as session:
            row = (await session.execute(query)).first()
        if row is None:
            return None
        return KeyRef(
            row.id,
            row.wallet,
            "sandbox" if row.mode == "sandbox" else "live",
            row.app_id,
            row.markup_bps or 0,
            row.rate_per_minute,
        )

    async def list_keys(self, wallet: str) -> list[ApiKeyView]:
        query = (
            select(ApiKeyRecord)
            .where(ApiKeyRecord.wallet == wallet)
            .order_by(ApiKeyRecord.created_at.desc(), ApiKeyRecord.id)
        )
        async with self.sessions() as session:
            return [ApiKeyView.of(r) for r in (await session.scalars(query)).all()]

    async def key_view(self, key_id: str) -> ApiKeyView | None:
        async with self.sessions() as session:
            row = await session.get(ApiKeyRecord, key_id)
            return None if row is None else ApiKeyView.of(row)

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
        """Changes `name`, `spend_cap` and/or `rate_per_minute` of one of `wallet`'s keys. KeyError
        if not theirs."""
        unknown = set(values) - {"name", "spend_cap", "rate_per_minute"}
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

    # ---- why a reservation was refused -----------------------------------------------------------

    async def diagnose(self, key: KeyRef, now_ts: int, margin: int, where: Shortfall) -> Shortfall:
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
        if key.markup_bps and (
            permission.developer != key.wallet or permission.max_markup_bps < key.markup_bps
        ):
            return "markup"
        view = AccountView.of(account_row)  # the tighter of the two is the one to raise
        return "permission" if view.permission_remaining <= view.deposit_available else "deposit"

    # ---- accounts and permissions ----------------------------------------------------------------

    async def get_account(self, wallet: str) -> AccountView | None:
        async with self.sessions() as session:
            row = await session.get(ConsumerAccount, wallet)
            return None if row is None else AccountView.of(row)

    async def ensure_account(self, wallet: str) -> None:
        statement = insert_ignore(self.dialect, table(ConsumerAccount), _new_account(wallet))
        await self.transactions.run(_rows_changed, statement)

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
        statement = (
            update(ConsumerAccount)
            .where(
                ConsumerAccount.wallet == wallet,
                ConsumerAccount.deposit == seen.deposit,
                ConsumerAccount.permission_spent == seen.permission_spent,
                digest_unchanged,
            )
            .values(**values)
        )
        return bool(await self.transactions.run(_rows_changed, statement) == 1)

    async def wallets_to_refresh(self, limit: int) -> list[str]:
        """Accounts with an active permission or connected to an app, least recently synced first."""
        query = (
            select(ConsumerAccount.wallet)
            .where(
                or_(
                    ConsumerAccount.permission_digest.is_not(None),
                    ConsumerAccount.wallet.in_(select(AppUser.wallet).where(AppUser.wallet.is_not(None))),
                )
            )
            .order_by(ConsumerAccount.synced_at.asc().nulls_first(), ConsumerAccount.wallet)
            .limit(limit)
        )
        async with self.sessions() as session:
            return list((await session.scalars(query)).all())

    async def activate_permission(self, permission: PermissionView, spent: int) -> None:
        """Stores a verified permission and makes it the account's active one."""
        async with self.sessions.begin() as session:
            await store_permission(session, self.dialect, permission, spent)
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
        statement = (
            update(SpendPermissionRecord)
            .where(SpendPermissionRecord.digest == digest, SpendPermissionRecord.revoked_at.is_(None))
            .values(revoked_at=now or utcnow())
        )
        await self.transactions.run(_rows_changed, statement)

    async def connection(self, app_id: str, external_id: str) -> tuple[str, PermissionView | None] | None:
        """The wallet an app's end user pays with and the permission it connected (None: the
        developer pays)."""
        async with self.sessions() as session:
            row = await session.get(AppUser, (app_id, external_id))
            if row is None or row.wallet is None:
                return None
            permission = (
                None
                if row.permission_digest is None
                else await session.get(SpendPermissionRecord, row.permission_digest)
            )
            return row.wallet, None if permission is None else PermissionView.of(permission)

    async def connected_permissions(self, wallet: str) -> list[str]:
        """The digests of the wallet's permissions connected to apps and not revoked."""
        query = (
            select(SpendPermissionRecord.digest)
            .join(AppUser, AppUser.permission_digest == SpendPermissionRecord.digest)
            .where(SpendPermissionRecord.consumer == wallet, SpendPermissionRecord.revoked_at.is_(None))
            .distinct()
        )
        async with self.sessions() as session:
            return list((await session.scalars(query)).all())

    async def is_connected(self, digest: str) -> bool:
        """Whether an end user connected this permission to an app."""
        query = select(func.count()).select_from(AppUser).where(AppUser.permission_digest == digest)
        async with self.sessions() as session:
            return int((await session.execute(query)).scalar_one()) > 0

    async def user_headroom(self, app_id: str, external_id: str) -> int:
        """What an app's end user may still reserve: grants left plus spend limit left, less its
        open reservations (only read to explain a refusal)."""
        async with self.sessions() as session:
            row = await session.get(AppUser, (app_id, external_id))
        if row is None or row.spend_limit is None:
            return 0 if row is None else 2**63 - 1
        return row.spend_limit - row.spent + row.granted - row.grant_used - row.reserved

    # ---- history ---------------------------------------------------------------------------------

    async def settled_total(self, wallet: str) -> int:
        """What the wallet's prepaid calls settled on-chain add up to."""
        query = select(func.coalesce(func.sum(Call.amount), 0)).where(
            Call.payer == wallet, Call.gate == "prepaid", Call.state == "settled"
        )
        async with self.sessions() as session:
            return int((await session.execute(query)).scalar_one())
