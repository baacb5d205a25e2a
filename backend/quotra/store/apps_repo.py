"""Apps, their end users and grants, and the developer's view of their calls (usage, analytics).

An end user's row is created by its first call (`quotra.calls.store`), by a grant or by a spend
limit, whichever comes first; its money columns move only in one transaction each (a reservation,
a finish, a grant), so replicas never lose an update.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, literal_column, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from quotra.calls.records import CallView
from quotra.store.models import App, AppUser, Call, Grant, table, utcnow
from quotra.store.repositories import Store
from quotra.store.sql import insert_ignore

# Calls that were served (not voided): what analytics count; and the ones charged at their amount.
SERVED_STATES = ("captured", "settling", "reconciling", "settled", "failed", "refunded")
CHARGED_STATES = ("captured", "settling", "reconciling", "settled")


@dataclass(frozen=True)
class AppView:
    id: str
    owner: str
    name: str
    markup_bps: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: App) -> AppView:
        return cls(row.id, row.owner, row.name, row.markup_bps, row.created_at, row.updated_at)


@dataclass(frozen=True)
class UserView:
    """An app's end user; see `quotra.store.models.AppUser` for the accounting."""

    app_id: str
    external_id: str
    spend_limit: int | None
    spent: int
    reserved: int
    granted: int
    grant_used: int
    created_at: datetime | None
    wallet: str | None = None  # connected: the user pays its calls from its own deposit

    @classmethod
    def of(cls, row: AppUser) -> UserView:
        return cls(
            row.app_id,
            row.external_id,
            row.spend_limit,
            row.spent,
            row.reserved,
            row.granted,
            row.grant_used,
            row.created_at,
            row.wallet,
        )

    @classmethod
    def new(cls, app_id: str, external_id: str) -> UserView:
        """A user the app has not served yet: nothing granted, spent or limited."""
        return cls(app_id, external_id, None, 0, 0, 0, 0, None)

    @property
    def grant_remaining(self) -> int:
        return self.granted - self.grant_used

    @property
    def limit_remaining(self) -> int | None:
        return None if self.spend_limit is None else max(0, self.spend_limit - self.spent)

    @property
    def headroom(self) -> int | None:
        """What the user may still reserve (None: only the developer's balance limits it)."""
        if self.spend_limit is None:
            return None
        return max(0, self.spend_limit - self.spent + self.grant_remaining - self.reserved)


@dataclass(frozen=True)
class GrantView:
    id: str
    app_id: str
    external_user_id: str | None
    wallet: str | None
    amount: int
    description: str
    tx_hash: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: Grant) -> GrantView:
        return cls(
            row.id,
            row.app_id,
            row.external_user_id,
            row.wallet,
            row.amount,
            row.description,
            row.tx_hash,
            row.created_at,
        )


@dataclass(frozen=True)
class Totals:
    """Usage of some calls: served calls, tokens, what was charged (base cost plus markup), the
    developer's markup revenue and the part grants paid."""

    calls: int
    prompt_tokens: int
    completion_tokens: int
    charged: int
    markup: int
    granted: int

    @property
    def base(self) -> int:
        return self.charged - self.markup


def _new_user(app_id: str, external_id: str) -> dict[str, Any]:
    return {
        "app_id": app_id,
        "external_id": external_id,
        "wallet": None,
        "spend_limit": None,
        "spent": 0,
        "reserved": 0,
        "granted": 0,
        "grant_used": 0,
        "created_at": utcnow(),
    }


class AppsStore:
    def __init__(self, store: Store) -> None:
        self.sessions = store.sessions
        self.dialect = store.dialect

    # ---- apps ----------------------------------------------------------------------------------

    async def create_app(self, *, app_id: str, owner: str, name: str, markup_bps: int) -> AppView:
        async with self.sessions.begin() as session:
            now = utcnow()
            row = App(
                id=app_id, owner=owner, name=name, markup_bps=markup_bps, created_at=now, updated_at=now
            )
            session.add(row)
            await session.flush()
            return AppView.of(row)

    async def get_app(self, app_id: str) -> AppView | None:
        async with self.sessions() as session:
            row = await session.get(App, app_id)
            return None if row is None else AppView.of(row)

    async def list_apps(self, owner: str) -> list[AppView]:
        query = select(App).where(App.owner == owner).order_by(App.created_at, App.id)
        async with self.sessions() as session:
            return [AppView.of(r) for r in (await session.scalars(query)).all()]

    async def count_apps(self, owner: str) -> int:
        query = select(func.count()).select_from(App).where(App.owner == owner)
        async with self.sessions() as session:
            return int((await session.execute(query)).scalar_one())

    async def update_app(self, app_id: str, **values: Any) -> AppView:
        """Changes `name` and/or `markup_bps` (for calls reserved from then on)."""
        unknown = set(values) - {"name", "markup_bps"}
        if unknown:
            raise TypeError(f"unknown app fields {sorted(unknown)}")
        async with self.sessions.begin() as session:
            row = await session.get(App, app_id, with_for_update=True)
            if row is None:
                raise KeyError(app_id)
            for name, value in values.items():
                setattr(row, name, value)
            row.updated_at = utcnow()
            await session.flush()
            return AppView.of(row)

    async def highest_markup(self, owner: str) -> int:
        """The highest markup of the wallet's apps (0 without apps): what its permission must allow."""
        query = select(func.coalesce(func.max(App.markup_bps), 0)).where(App.owner == owner)
        async with self.sessions() as session:
            return int((await session.execute(query)).scalar_one())

    # ---- end users -------------------------------------------------------------------------------

    async def user(self, app_id: str, external_id: str) -> UserView:
        async with self.sessions() as session:
            row = await session.get(AppUser, (app_id, external_id))
            return UserView.new(app_id, external_id) if row is None else UserView.of(row)

    async def users(self, app_id: str, *, limit: int, after: str | None = None) -> list[UserView]:
        """An app's end users by id, `limit` from after `after`."""
        query = select(AppUser).where(AppUser.app_id == app_id).order_by(AppUser.external_id).limit(limit)
        if after is not None:
            query = query.where(AppUser.external_id > after)
        async with self.sessions() as session:
            return [UserView.of(r) for r in (await session.scalars(query)).all()]

    async def _ensure_user(self, session: AsyncSession, app_id: str, external_id: str) -> None:
        await session.execute(insert_ignore(self.dialect, table(AppUser), _new_user(app_id, external_id)))

    async def _set_user(self, app_id: str, external_id: str, **values: Any) -> UserView:
        """Sets columns of the end user's row (created if new) and reads it back."""
        async with self.sessions.begin() as session:
            await self._ensure_user(session, app_id, external_id)
            await session.execute(
                update(AppUser)
                .where(AppUser.app_id == app_id, AppUser.external_id == external_id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        return await self.user(app_id, external_id)

    async def set_limit(self, app_id: str, external_id: str, spend_limit: int | None) -> UserView:
        """Sets (None: removes) the most the user's own money may spend, grants aside. Calls
        already reserved keep their reservation."""
        return await self._set_user(app_id, external_id, spend_limit=spend_limit)

    async def connect_wallet(self, app_id: str, external_id: str, wallet: str) -> UserView:
        """The user pays its calls from `wallet`'s deposit from now on (its permission for the
        app is the wallet's active one)."""
        return await self._set_user(app_id, external_id, wallet=wallet)

    # ---- grants ----------------------------------------------------------------------------------

    async def outstanding_grants(self, owner: str) -> int:
        """What the developer's hosted users may still spend of their grants: held back from the
        developer's own available balance."""
        query = (
            select(func.coalesce(func.sum(AppUser.granted - AppUser.grant_used), 0))
            .join(App, App.id == AppUser.app_id)
            .where(App.owner == owner)
        )
        async with self.sessions() as session:
            return int((await session.execute(query)).scalar_one())

    async def grant_user(
        self, *, grant_id: str, app_id: str, external_id: str, amount: int, description: str
    ) -> tuple[GrantView, UserView]:
        """A grant to a hosted end user: its sub-budget grows by `amount`, in one transaction with
        the grant's record."""
        async with self.sessions.begin() as session:
            await self._ensure_user(session, app_id, external_id)
            await session.execute(
                update(AppUser)
                .where(AppUser.app_id == app_id, AppUser.external_id == external_id)
                .values(granted=AppUser.granted + amount)
                .execution_options(synchronize_session=False)
            )
            row = Grant(
                id=grant_id,
                app_id=app_id,
                external_user_id=external_id,
                wallet=None,
                amount=amount,
                description=description,
                tx_hash=None,
                created_at=utcnow(),
            )
            session.add(row)
            await session.flush()
            grant = GrantView.of(row)
        return grant, await self.user(app_id, external_id)

    async def record_wallet_grant(
        self, *, grant_id: str, app_id: str, wallet: str, amount: int, description: str, tx_hash: str
    ) -> GrantView | None:
        """A grant the developer made on-chain (`deposit(amount, wallet)` in `tx_hash`); None if
        that transaction was recorded as a grant already."""
        async with self.sessions.begin() as session:
            result = await session.execute(
                insert_ignore(
                    self.dialect,
                    table(Grant),
                    {
                        "id": grant_id,
                        "app_id": app_id,
                        "external_user_id": None,
                        "wallet": wallet,
                        "amount": amount,
                        "description": description,
                        "tx_hash": tx_hash,
                        "created_at": utcnow(),
                    },
                )
            )
            if int(getattr(result, "rowcount", 0)) != 1:
                return None
            row = await session.get(Grant, grant_id)
            assert row is not None
            return GrantView.of(row)

    async def grants(self, app_id: str, *, limit: int) -> list[GrantView]:
        query = select(Grant).where(Grant.app_id == app_id).order_by(Grant.created_at.desc()).limit(limit)
        async with self.sessions() as session:
            return [GrantView.of(r) for r in (await session.scalars(query)).all()]

    # ---- usage and analytics ---------------------------------------------------------------------

    async def user_calls(
        self, app_id: str, external_id: str, *, limit: int, before: str | None = None
    ) -> list[CallView]:
        """An end user's calls, newest first; `before`: the call id the previous page ended with."""
        calls = table(Call)
        query = (
            select(calls)
            .where(calls.c.app_id == app_id, calls.c.end_user == external_id)
            .order_by(calls.c.id.desc())
            .limit(limit)
        )
        if before is not None:
            query = query.where(calls.c.id < before)
        async with self.sessions() as session:
            return [CallView.of(row) for row in (await session.execute(query)).all()]

    async def analytics(
        self, app_id: str, start: datetime, end: datetime, *, sandbox: bool
    ) -> tuple[Totals, dict[str, Totals]]:
        """An app's served calls created in [start, end): totals, and per end user (calls made
        without one under the empty id). `sandbox`: its sandbox keys' calls (test money) instead
        of its live ones."""
        calls = table(Call)
        gate = "sandbox" if sandbox else "prepaid"
        metered = calls.c.state == "settled" if sandbox else calls.c.state.in_(CHARGED_STATES)

        def money(column: Any) -> Any:
            return func.coalesce(func.sum(case((metered, column), else_=0)), 0)

        # The same SQL text in SELECT and GROUP BY: with a bound "" in each, PostgreSQL sees two
        # different expressions and refuses the query.
        end_user = func.coalesce(calls.c.end_user, literal_column("''"))
        query = (
            select(
                end_user,
                func.count(),
                func.coalesce(func.sum(calls.c.prompt_tokens), 0),
                func.coalesce(func.sum(calls.c.completion_tokens), 0),
                money(calls.c.amount),
                money(calls.c.markup),
                money(calls.c.granted),
            )
            .where(
                and_(
                    calls.c.app_id == app_id,
                    calls.c.gate == gate,
                    calls.c.state.in_(SERVED_STATES),
                    calls.c.created_at >= start,
                    calls.c.created_at < end,
                )
            )
            .group_by(end_user)
        )
        async with self.sessions() as session:
            rows = (await session.execute(query)).all()
        per_user = {str(r[0]): Totals(*(int(v) for v in r[1:])) for r in rows}
        total = Totals(*(sum(getattr(t, f) for t in per_user.values()) for f in Totals.__dataclass_fields__))
        return total, per_user
