"""Reads for the marketplace: a provider's record, computed from the relay's own call records,
and how many free playground calls a caller has used per listing.

A record counts every call of the provider's listings (whatever paid for it): `served` the calls
the upstream answered (outcome `ok`), the success rate over those and the upstream's failures
(a client that hung up or a relay error is not the provider's doing), the median latency of the
latest served calls, and the provider's age as the creation of its first listing. The queries go
through the calls' (listing, created) index.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from quotra.store.models import Call, Listing, PlaygroundUsage, table

CALLS: Final = table(Call)
LISTINGS: Final = table(Listing)
PLAYGROUND: Final = table(PlaygroundUsage)
LATENCY_SAMPLE: Final = 500  # the median is over a provider's latest served calls


@dataclass(frozen=True)
class ProviderRecord:
    address: str
    listings: int
    calls_served: int
    upstream_failures: int
    median_latency_ms: int | None
    first_listed_at: datetime

    @property
    def success_rate(self) -> float | None:
        answered = self.calls_served + self.upstream_failures
        return None if answered == 0 else self.calls_served / answered


def _records(connection: Connection, addresses: list[str]) -> list[ProviderRecord]:
    owned: dict[str, list[str]] = {}
    first: dict[str, datetime] = {}
    for owner, listing_id, created in connection.execute(
        select(LISTINGS.c.owner, LISTINGS.c.id, LISTINGS.c.created_at).where(LISTINGS.c.owner.in_(addresses))
    ):
        owned.setdefault(owner, []).append(listing_id)
        first[owner] = min(first.get(owner, created), created)
    records = []
    for owner, listing_ids in owned.items():
        counts: dict[str, int] = dict(
            connection.execute(
                select(CALLS.c.outcome, func.count())
                .where(CALLS.c.listing_id.in_(listing_ids), CALLS.c.outcome.in_(("ok", "upstream_error")))
                .group_by(CALLS.c.outcome)
            ).all()
        )
        latencies = connection.execute(
            select(CALLS.c.duration_ms)
            .where(
                CALLS.c.listing_id.in_(listing_ids),
                CALLS.c.outcome == "ok",
                CALLS.c.duration_ms.is_not(None),
            )
            .order_by(CALLS.c.created_at.desc())
            .limit(LATENCY_SAMPLE)
        ).scalars()
        sample = list(latencies)
        records.append(
            ProviderRecord(
                address=owner,
                listings=len(listing_ids),
                calls_served=int(counts.get("ok", 0)),
                upstream_failures=int(counts.get("upstream_error", 0)),
                median_latency_ms=round(statistics.median(sample)) if sample else None,
                first_listed_at=first[owner],
            )
        )
    return records


def _free_calls_used(connection: Connection, consumer: str) -> dict[str, int]:
    rows = connection.execute(
        select(PLAYGROUND.c.listing_id, PLAYGROUND.c.calls).where(PLAYGROUND.c.consumer == consumer)
    )
    return {str(listing_id): int(calls) for listing_id, calls in rows}


class MarketReads:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def _read(self, work: Any, *args: Any) -> Any:
        async with self.engine.connect() as connection:
            return await connection.run_sync(work, *args)

    async def provider_records(self, addresses: Iterable[str]) -> list[ProviderRecord]:
        """The records of these providers (checksummed addresses) that ever listed a key."""
        result: list[ProviderRecord] = await self._read(_records, sorted(set(addresses)))
        return result

    async def free_calls_used(self, consumer: str) -> dict[str, int]:
        """Listing id → free playground calls the caller id `consumer` has used on it."""
        result: dict[str, int] = await self._read(_free_calls_used, consumer)
        return result
