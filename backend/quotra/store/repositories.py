"""The repository: every database statement the relay runs, each in its own short transaction.

Counters that must never overshoot (listing calls, playground calls, SIWE nonces) are changed
with one conditional UPDATE, which both SQLite and PostgreSQL apply atomically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Select, and_, delete, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from quotra.store.models import Call, Listing, PlaygroundUsage, SiweNonce, utc_day, utcnow

ListingSort = Literal["price", "-price", "remaining", "-remaining", "newest", "oldest"]


@dataclass(frozen=True)
class ListingRecord:
    """An immutable snapshot of a listing row (safe to cache and share between requests)."""

    id: str
    owner: str
    kind: str
    base_url: str | None
    models: tuple[str, ...]
    api_key_sealed: str
    price_per_call: int
    price_input_per_mtok: int | None
    price_output_per_mtok: int | None
    max_calls: int | None
    calls_used: int
    max_input_chars: int | None
    max_input_tokens: int | None
    max_output_tokens: int | None
    rate_per_minute: int | None
    free_calls_per_day: int | None  # None: the relay's default
    free_calls_day: int
    free_calls_today: int
    expires_at: datetime | None
    status: str
    failure_streak: int
    cooldown_until: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Listing) -> ListingRecord:
        values = {f.name: getattr(row, f.name) for f in fields(cls)}
        values["models"] = tuple(values["models"])
        return cls(**values)

    @property
    def remaining_calls(self) -> int | None:
        return None if self.max_calls is None else max(0, self.max_calls - self.calls_used)

    def is_live(self, now: datetime) -> bool:
        return (
            self.status == "active"
            and (self.expires_at is None or self.expires_at > now)
            and (self.max_calls is None or self.calls_used < self.max_calls)
        )

    def in_cooldown(self, now: datetime) -> bool:
        return self.cooldown_until is not None and self.cooldown_until > now

    def free_calls_budget(self, default: int) -> int:
        """Free playground calls the listing gives a day, shared by all its consumers."""
        return default if self.free_calls_per_day is None else self.free_calls_per_day

    def free_calls_left(self, now: datetime, default: int) -> int:
        """Free playground calls the listing still gives today (UTC)."""
        used = self.free_calls_today if self.free_calls_day == utc_day(now) else 0
        return max(0, self.free_calls_budget(default) - used)


_LISTING_COLUMNS = {f.name for f in fields(ListingRecord)} - {"created_at", "updated_at"}


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self.dialect = engine.dialect.name

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    # ---- listings ------------------------------------------------------------------------------

    async def create_listing(self, **values: Any) -> ListingRecord:
        unknown = set(values) - _LISTING_COLUMNS
        if unknown:
            raise TypeError(f"unknown listing fields {sorted(unknown)}")
        values["models"] = list(values["models"])
        async with self.sessions.begin() as session:
            row = Listing(**values)
            session.add(row)
            await session.flush()
            await session.refresh(row)
            return ListingRecord.of(row)

    async def get_listing(self, listing_id: str) -> ListingRecord | None:
        async with self.sessions() as session:
            row = await session.get(Listing, listing_id)
            return None if row is None else ListingRecord.of(row)

    async def update_listing(self, listing_id: str, **values: Any) -> ListingRecord | None:
        unknown = set(values) - _LISTING_COLUMNS
        if unknown:
            raise TypeError(f"unknown listing fields {sorted(unknown)}")
        if "models" in values:
            values["models"] = list(values["models"])
        async with self.sessions.begin() as session:
            row = await session.get(Listing, listing_id, with_for_update=True)
            if row is None:
                return None
            for key, value in values.items():
                setattr(row, key, value)
            row.updated_at = utcnow()
            await session.flush()
            return ListingRecord.of(row)

    def _search(
        self,
        *,
        owner: str | None,
        live_only: bool,
        model: str | None,
        max_price: int | None,
        min_remaining: int | None,
        now: datetime,
    ) -> Select[Listing]:
        query = select(Listing)
        if owner is not None:
            query = query.where(Listing.owner == owner)
        if live_only:
            query = query.where(
                Listing.status == "active",
                or_(Listing.expires_at.is_(None), Listing.expires_at > now),
                or_(Listing.max_calls.is_(None), Listing.calls_used < Listing.max_calls),
            )
        if max_price is not None:
            query = query.where(Listing.price_per_call <= max_price)
        if min_remaining is not None:
            query = query.where(
                or_(Listing.max_calls.is_(None), Listing.max_calls - Listing.calls_used >= min_remaining)
            )
        return query

    async def search_listings(
        self,
        *,
        owner: str | None = None,
        live_only: bool = True,
        model: str | None = None,
        max_price: int | None = None,
        min_remaining: int | None = None,
        sort: ListingSort = "price",
        limit: int = 50,
        offset: int = 0,
        now: datetime | None = None,
    ) -> list[ListingRecord]:
        now = now or utcnow()
        query = self._search(
            owner=owner,
            live_only=live_only,
            model=model,
            max_price=max_price,
            min_remaining=min_remaining,
            now=now,
        )
        remaining = func.coalesce(Listing.max_calls - Listing.calls_used, 2**62)
        order: tuple[Any, ...] = {
            "price": (Listing.price_per_call.asc(), Listing.created_at.asc()),
            "-price": (Listing.price_per_call.desc(), Listing.created_at.asc()),
            "remaining": (remaining.asc(), Listing.created_at.asc()),
            "-remaining": (remaining.desc(), Listing.created_at.asc()),
            "newest": (Listing.created_at.desc(),),
            "oldest": (Listing.created_at.asc(),),
        }[sort]
        query = query.order_by(*order, Listing.id)
        async with self.sessions() as session:
            rows = [ListingRecord.of(r) for r in (await session.scalars(query)).all()]
        if model is not None:  # JSON membership differs per dialect; filter in Python
            rows = [r for r in rows if model in r.models]
        return rows[offset : offset + limit]

    async def live_listings(self, now: datetime | None = None) -> list[ListingRecord]:
        return await self.search_listings(limit=2**31, now=now)

    async def note_upstream_failure(
        self, listing_id: str, *, threshold: int, cooldown: timedelta, now: datetime | None = None
    ) -> bool:
        """Counts a key failure (401/429); True when this one put the listing in cooldown."""
        now = now or utcnow()
        async with self.sessions.begin() as session:
            row = await session.get(Listing, listing_id, with_for_update=True)
            if row is None:
                return False
            row.failure_streak += 1
            if row.failure_streak >= threshold:
                row.cooldown_until = now + cooldown
                row.failure_streak = 0
                return True
            return False

    async def note_upstream_success(self, listing_id: str) -> None:
        statement = (
            update(Listing)
            .where(Listing.id == listing_id, Listing.failure_streak > 0)
            .values(failure_streak=0)
            .execution_options(synchronize_session=False)
        )
        async with self.sessions.begin() as session:
            await session.execute(statement)

    async def playground_calls(self, listing_id: str, consumer: str) -> int:
        """Free calls `consumer` took of the listing (its playground budget used)."""
        async with self.sessions() as session:
            row = await session.get(PlaygroundUsage, (listing_id, consumer))
            return 0 if row is None else row.calls

    async def count_calls(self, listing_id: str, outcome: str | None = None) -> int:
        """Calls the listing served (finished, voided ones excepted), optionally of one outcome."""
        query = (
            select(func.count())
            .select_from(Call)
            .where(Call.listing_id == listing_id, Call.state.not_in(("reserved", "voided")))
        )
        if outcome is not None:
            query = query.where(Call.outcome == outcome)
        async with self.sessions() as session:
            return int((await session.execute(query)).scalar_one())

    # ---- SIWE nonces ---------------------------------------------------------------------------

    async def create_nonce(self, nonce: str, expires_at: datetime) -> None:
        async with self.sessions.begin() as session:
            session.add(SiweNonce(nonce=nonce, expires_at=expires_at))

    async def consume_nonce(self, nonce: str, now: datetime | None = None) -> bool:
        """Marks an unexpired, unused nonce used; False if it was unknown, expired or used."""
        now = now or utcnow()
        async with self.sessions.begin() as session:
            result = await session.execute(
                update(SiweNonce)
                .where(
                    and_(SiweNonce.nonce == nonce, SiweNonce.used_at.is_(None), SiweNonce.expires_at > now)
                )
                .values(used_at=now)
                .execution_options(synchronize_session=False)
            )
            # Old nonces are swept here rather than by a background job.
            await session.execute(delete(SiweNonce).where(SiweNonce.expires_at < now - timedelta(days=1)))
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    # ---- master-key rotation -------------------------------------------------------------------

    async def rewrap_keys(self, rewrap: Callable[[str, str], str | None]) -> int:
        """Re-seals every listing's key in one transaction; `rewrap` returns None to skip a row."""
        changed = 0
        async with self.sessions.begin() as session:
            rows: Iterable[Listing] = (await session.scalars(select(Listing).with_for_update())).all()
            for row in rows:
                new = rewrap(row.id, row.api_key_sealed)
                if new is not None:
                    row.api_key_sealed = new
                    changed += 1
        return changed
