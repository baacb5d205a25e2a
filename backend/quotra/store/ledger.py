"""The append-only ledger: entries are inserted in the same transaction as the state change they
record, and never updated or deleted (nothing in the code base issues UPDATE/DELETE on it)."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from quotra.store.models import LedgerEntry

EntryKind = Literal[
    "reserve", "capture", "release", "void", "settle", "refund", "reconcile", "deposit", "withdraw", "claim"
]
Method = Literal["x402", "prepaid", "chain"]


async def append(
    session: AsyncSession,
    *,
    kind: EntryKind,
    method: Method,
    account: str,
    amount: int,
    provider: str | None = None,
    listing_id: str | None = None,
    call_id: int | None = None,
    fee: int | None = None,
    reference: str | None = None,
    batch_id: int | None = None,
    tx_hash: str | None = None,
) -> None:
    """Insert one entry inside the caller's transaction."""
    await session.execute(
        insert(LedgerEntry).values(
            kind=kind,
            method=method,
            account=account,
            amount=amount,
            provider=provider,
            listing_id=listing_id,
            call_id=call_id,
            fee=fee,
            reference=reference,
            batch_id=batch_id,
            tx_hash=tx_hash,
        )
    )
