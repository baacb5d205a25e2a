"""Consumers' periodic USDC allowances to the relay (ERC-7715 `erc20-token-periodic` grants as
Delegation Framework permission contexts) and how their top-ups went."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime

from sqlalchemy import select, update

from quotra.store.models import AllowanceRecord, table, utcnow
from quotra.store.repositories import Store
from quotra.store.sql import insert_ignore


@dataclass(frozen=True)
class AllowanceView:
    hash: str
    wallet: str
    context: str
    period_amount: int
    period_duration: int
    start_date: int
    expiry: int | None
    revoked_at: datetime | None
    last_top_up_at: datetime | None
    last_error: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: AllowanceRecord) -> AllowanceView:
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


class AllowancesRepo:
    def __init__(self, store: Store) -> None:
        self.sessions = store.sessions
        self.dialect = store.dialect

    async def save(
        self,
        *,
        hash: str,
        wallet: str,
        context: str,
        period_amount: int,
        period_duration: int,
        start_date: int,
        expiry: int | None,
    ) -> AllowanceView:
        values = {
            "hash": hash,
            "wallet": wallet,
            "context": context,
            "period_amount": period_amount,
            "period_duration": period_duration,
            "start_date": start_date,
            "expiry": expiry,
            "created_at": utcnow(),
        }
        async with self.sessions.begin() as session:
            await session.execute(insert_ignore(self.dialect, table(AllowanceRecord), values))
            row = await session.get(AllowanceRecord, hash)
            assert row is not None
            return AllowanceView.of(row)

    async def of_wallet(self, wallet: str) -> list[AllowanceView]:
        query = (
            select(AllowanceRecord)
            .where(AllowanceRecord.wallet == wallet)
            .order_by(AllowanceRecord.created_at)
        )
        async with self.sessions() as session:
            return [AllowanceView.of(r) for r in (await session.scalars(query)).all()]

    async def unrevoked(self) -> list[AllowanceView]:
        """Allowances not revoked (expired ones included: expiry is the chain's time)."""
        query = select(AllowanceRecord).where(AllowanceRecord.revoked_at.is_(None))
        async with self.sessions() as session:
            return [AllowanceView.of(r) for r in (await session.scalars(query)).all()]

    async def outcome(self, hash: str, *, error: str | None) -> None:
        """Record a top-up: done (no error) or refused/failed (the reason)."""
        values: dict[str, object] = {"last_error": error[:300] if error else None}
        if error is None:
            values["last_top_up_at"] = utcnow()
        async with self.sessions.begin() as session:
            await session.execute(
                update(AllowanceRecord).where(AllowanceRecord.hash == hash).values(**values)
            )

    async def revoke(self, hash: str) -> None:
        async with self.sessions.begin() as session:
            await session.execute(
                update(AllowanceRecord)
                .where(AllowanceRecord.hash == hash, AllowanceRecord.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
