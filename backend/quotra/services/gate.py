"""The payment gate: `authorize` before a call is served, then `capture` or `void` it.

Today it knows two ways to be allowed a call: the free playground (a few calls per listing per
consumer, counted atomically in the database) and sandbox API keys (sandbox listings only).
x402 and prepaid balances plug in here as further `Authorization` kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from quotra.errors import PaymentRequired
from quotra.store.prepaid_repo import KeyRef
from quotra.store.repositories import ListingRecord, Store
from quotra.upstream.base import Usage

if TYPE_CHECKING:
    from quotra.payments.prepaid import PrepaidService
    from quotra.payments.x402_gate import X402Attempt, X402Gate

CallerKind = Literal["anonymous", "wallet", "sandbox_key", "api_key"]


@dataclass(frozen=True)
class Caller:
    """Who is calling: `id` is the key for quotas and rate limits (wallet, client IP or key hash)."""

    kind: CallerKind
    id: str
    api_key: KeyRef | None = None  # kind "api_key": the prepaid key (quotra.payments.prepaid)
    payment: X402Attempt | None = None  # an x402 payment header (quotra.payments.x402_gate)


def usdc(atomic: int) -> str:
    return f"{Decimal(atomic) / Decimal(10**6):.6f}"


class Authorization(Protocol):
    gate: str

    async def capture(self, cost_atomic: int) -> None: ...

    async def void(self) -> None: ...


@runtime_checkable
class Metered(Protocol):
    """An authorization that records what was served (model, tokens) with its capture."""

    def meter(self, model: str, usage: Usage) -> None: ...


@runtime_checkable
class PaymentResponder(Protocol):
    """An authorization that answers with payment headers (x402's `PAYMENT-RESPONSE`, a signed
    receipt) and, at the end of a stream, an event about the payment."""

    def response_headers(self, usage: Usage | None, model: str) -> dict[str, str]: ...

    def settlement_event(self, usage: Usage | None, model: str) -> dict[str, Any]: ...


@dataclass
class PlaygroundAuthorization:
    store: Store
    listing_id: str
    consumer: str
    gate: str = "playground"

    async def capture(self, cost_atomic: int) -> None:
        return None  # free: the call was already counted by authorize

    async def void(self) -> None:
        await self.store.return_playground_call(self.listing_id, self.consumer)


@dataclass
class SandboxAuthorization:
    gate: str = "sandbox"

    async def capture(self, cost_atomic: int) -> None:
        return None

    async def void(self) -> None:
        return None


class PaymentGate:
    def __init__(
        self,
        store: Store,
        *,
        free_calls: int,
        prepaid: PrepaidService | None = None,
        x402: X402Gate | None = None,
    ) -> None:
        self.store = store
        self.free_calls = free_calls
        self.prepaid = prepaid
        self.x402 = x402

    async def authorize(self, caller: Caller, listing: ListingRecord, max_cost_atomic: int) -> Authorization:
        if caller.api_key is not None and self.prepaid is not None:
            return await self.prepaid.authorize(caller.api_key, listing, max_cost_atomic)
        if caller.kind == "sandbox_key":
            if listing.kind == "sandbox":
                return SandboxAuthorization()
            raise self._payment_required(
                listing, max_cost_atomic, "Sandbox API keys can only call sandbox listings."
            )
        if caller.payment is not None:
            if self.x402 is None:
                raise self._payment_required(listing, max_cost_atomic, "This relay takes no x402 payments.")
            return await self.x402.authorize(caller.payment, listing, max_cost_atomic)
        if self.free_calls > 0 and await self.store.take_playground_call(
            listing.id, caller.id, self.free_calls
        ):
            return PlaygroundAuthorization(self.store, listing.id, caller.id)
        raise self._payment_required(
            listing,
            max_cost_atomic,
            f"The {self.free_calls} free playground calls for listing {listing.id} are used up.",
        )

    def _payment_required(self, listing: ListingRecord, max_cost: int, reason: str) -> PaymentRequired:
        message = (
            f"{reason} Further calls cost {usdc(max_cost)} USDC each: pay per call with x402 "
            "(retry with a PAYMENT-SIGNATURE header) or use a prepaid Quotra API key "
            "(sign in with Ethereum, deposit USDC into the escrow, create a key)."
        )
        extra = {
            "payment": {
                "listing": listing.id,
                "asset": "USDC",
                "price_per_call": usdc(listing.price_per_call),
                "max_amount": usdc(max_cost),
                "max_amount_atomic": str(max_cost),
                "methods": ["x402", "prepaid"],
                "free_calls_per_listing": self.free_calls,
            }
        }
        if self.x402 is not None and self.x402.ready:
            # The x402 offer: PAYMENT-REQUIRED header (v2) and the v1 form in the body.
            return self.x402.required(listing, max_cost, message, extra=extra)
        return PaymentRequired(message, code="payment_required", extra=extra)
