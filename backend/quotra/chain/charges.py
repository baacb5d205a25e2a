"""Prepaid charges as the escrow's `settle_charges` takes them: one word each.

A charge is `provider << 96 | amount` (see `QuotraEscrow.vy`); the relay sums the
captured calls of one provider under one permission into one charge.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from eth_utils import to_checksum_address

AMOUNT_BITS: Final = 96
MAX_AMOUNT: Final = (1 << AMOUNT_BITS) - 1


def pack_charge(provider: str, amount: int) -> int:
    """Pack one charge; refuses a zero provider and amounts outside (0, 2**96)."""
    address = int(provider, 16)
    if address == 0:
        raise ValueError("charge provider is the zero address")
    if not 0 < amount <= MAX_AMOUNT:
        raise ValueError("charge amount must be positive and below 2**96")
    return (address << AMOUNT_BITS) | amount


def aggregate(charges: Iterable[tuple[str, int]]) -> list[int]:
    """Sum amounts per provider (first-seen order) and pack them: one entry per provider."""
    totals: dict[str, int] = {}
    for provider, amount in charges:
        key = to_checksum_address(provider)
        totals[key] = totals.get(key, 0) + amount
    return [pack_charge(provider, amount) for provider, amount in totals.items()]
