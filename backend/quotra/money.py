"""USDC amounts and the platform's split, in one place: parsing, formatting, fees.

Amounts are integers of atomic units (USDC has 6 decimals) everywhere; text appears only at the
edges (the API, the CLI, messages). The split is the escrow's: `fee = amount * fee_bps // 10_000`,
the provider gets the rest; an app's markup comes on top and is the developer's alone.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Final

USDC_DECIMALS: Final = 6
USDC_UNIT: Final = 10**USDC_DECIMALS
MAX_BPS: Final = 10_000


def atomic(value: Decimal) -> int:
    """USDC as the API takes it (a validated decimal) in atomic units."""
    return int(value * USDC_UNIT)


def money_fields(name: str, amount: int) -> dict[str, object]:
    """An amount as the API answers it: USDC text beside its atomic integer (`name_atomic`)."""
    return {name: usdc(amount), f"{name}_atomic": amount}


def parse_usdc(text: str | int | Decimal) -> int:
    """Human USDC (`"1.50"`) to atomic units (1_500_000), exactly: no floats, no rounding.

    Raises ValueError on anything that is not a non-negative amount with at most 6 decimals."""
    try:
        value = Decimal(str(text).strip().replace("_", ""))
    except InvalidOperation:
        raise ValueError(f"not an amount: {text!r}") from None
    if not value.is_finite():
        raise ValueError(f"not an amount: {text!r}")
    if value < 0:
        raise ValueError(f"amount must not be negative: {text!r}")
    atomic = value * USDC_UNIT
    if atomic != atomic.to_integral_value():
        raise ValueError(f"USDC has {USDC_DECIMALS} decimals; {text!r} has more")
    return int(atomic)


def usdc(atomic: int) -> str:
    """Atomic units as plain decimal USDC with all 6 decimals (`1_500_000` -> `"1.500000"`):
    what the API returns and messages quote."""
    sign = "-" if atomic < 0 else ""
    whole, frac = divmod(abs(atomic), USDC_UNIT)
    return f"{sign}{whole}.{frac:06d}"


def format_usdc(atomic: int) -> str:
    """`usdc` with thousands separators, for people (`1_500_000_000` -> `"1,500.000000"`)."""
    sign = "-" if atomic < 0 else ""
    whole, frac = divmod(abs(atomic), USDC_UNIT)
    return f"{sign}{whole:,}.{frac:06d}"


def split_fee(amount: int, fee_bps: int) -> int:
    """The platform's fee of one payment; the provider gets `amount - fee`."""
    return amount * fee_bps // MAX_BPS


def markup_of(base: int, markup_bps: int) -> int:
    """An app developer's markup on a call's base cost, rounded down: the payer is charged
    `base + markup`, the developer credited all of the markup (the escrow checks it against the
    rate the payer's permission allows over each batch, which per-call rounding down never
    exceeds)."""
    return base * markup_bps // MAX_BPS


def allocate_fees(amounts: list[int], total_fee: int, fee_bps: int) -> list[int]:
    """Per-call fees of calls the escrow charged as one sum: each call's own fee, and what the
    rounding of the sum adds goes to the last call, so the parts add up to the escrow's fee."""
    fees = [split_fee(a, fee_bps) for a in amounts]
    if fees:
        fees[-1] += total_fee - sum(fees)
    return fees
