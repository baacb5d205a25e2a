"""The payment gate: which budget pays for a call, reserved in the call store before it is served.

A request pays with a prepaid API key (live or sandbox), an x402 payment, a static sandbox key
(sandbox listings only), or nothing: the playground's free calls. `PaymentGate.reserve` asks that
gate to reserve the call — one transaction of `quotra.calls.store` taking the listing's quota,
the budget and writing the call's row — and returns a `Reservation`. The relay then finishes or
voids the call in the store; the reservation tells it what to charge and what to answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

from quotra.calls.records import Refused
from quotra.calls.store import CallStore, Hold
from quotra.errors import PaymentRequired, QuotaExhausted
from quotra.money import markup_of, usdc
from quotra.ratelimit import Decision
from quotra.store.models import utcnow
from quotra.store.prepaid_repo import KeyRef
from quotra.store.repositories import ListingRecord
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
    end_user: str | None = None  # an app key's end user (`X-Quotra-User`, /v1/users/{id}/…)


class PaymentAnswer(Protocol):
    """What a paid call's answer says about its payment (x402: `PAYMENT-RESPONSE`, a signed
    receipt, and the last event of a stream). `charged` is the amount charged (0: nothing), None
    while it is not known yet (a stream's headers)."""

    def headers(self, usage: Usage | None, model: str, charged: int | None) -> dict[str, str]: ...

    def stream_event(self, usage: Usage | None, model: str, charged: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Reservation:
    """A reserved call: its id, the gate that pays, and what it charges for a given cost: what the
    call used, at most what was reserved (an x402 call: its authorization). An app key's call is
    charged its base cost plus the app's markup, reserved for its most base cost (`base_reserved`)
    with that base's markup."""

    call_id: str
    gate: str
    reserved: int
    answer: PaymentAnswer | None = None
    markup_bps: int = 0
    base_reserved: int | None = None  # with a markup: the most base cost reserved for
    rate: Decision | None = None  # an API key's rate limit, as this reservation took it

    def base(self, cost: int) -> int:
        """The base cost charged for a call that cost `cost` to serve (at most what was reserved)."""
        if self.gate == "playground":
            return 0
        cap = self.reserved if self.base_reserved is None else self.base_reserved
        return max(0, min(cost, cap))

    def markup(self, cost: int) -> int:
        """The app developer's markup on a call that cost `cost` to serve."""
        return markup_of(self.base(cost), self.markup_bps)

    def charge(self, cost: int) -> int:
        """What the payer is charged for a call that cost `cost` to serve, markup included."""
        return self.base(cost) + self.markup(cost)


def not_servable(listing: ListingRecord) -> QuotaExhausted:
    return QuotaExhausted(
        f"Listing '{listing.id}' cannot take a call now (no calls left, paused or expired)", param="model"
    )


class PaymentGate:
    def __init__(
        self,
        calls: CallStore,
        *,
        free_calls: int,
        daily_free_calls: int,
        call_timeout: float,
        prepaid: PrepaidService | None = None,
        x402: X402Gate | None = None,
    ) -> None:
        self.calls = calls
        self.free_calls = free_calls
        self.daily_free_calls = daily_free_calls  # a listing's, unless it sets its own
        self.call_timeout = timedelta(seconds=call_timeout)
        self.prepaid = prepaid
        self.x402 = x402

    def deadline(self) -> datetime:
        """When a reservation made now is voided if its call has not finished."""
        return utcnow() + self.call_timeout

    async def reserve(self, caller: Caller, listing: ListingRecord, max_cost: int) -> Reservation:
        if caller.api_key is not None and self.prepaid is not None:
            return await self.prepaid.reserve(
                caller.api_key, listing, max_cost, self.deadline(), end_user=caller.end_user
            )
        if caller.kind == "sandbox_key":
            if listing.kind != "sandbox":
                raise self._payment_required(
                    listing, max_cost, "Sandbox API keys can only call sandbox listings."
                )
            hold = Hold(caller.id, listing.id, listing.owner, 0, self.deadline())
            try:
                return Reservation(await self.calls.reserve_open(hold, gate="sandbox"), "sandbox", 0)
            except Refused:
                raise not_servable(listing) from None
        if caller.payment is not None:
            if self.x402 is None or not self.x402.offered:
                raise self._payment_required(listing, max_cost, "This relay takes no x402 payments.")
            return await self.x402.reserve(caller.payment, listing, max_cost, self.deadline())
        reason = f"The {self.free_calls} free playground calls for listing {listing.id} are used up."
        if self.free_calls > 0:
            hold = Hold(caller.id, listing.id, listing.owner, 0, self.deadline())
            try:
                call_id = await self.calls.reserve_playground(
                    hold, free_calls=self.free_calls, daily_default=self.daily_free_calls
                )
                return Reservation(call_id, "playground", 0)
            except Refused as refused:
                if refused.reason == "listing_unavailable":
                    raise not_servable(listing) from None
                if refused.reason == "daily_free_calls_used":
                    budget = listing.free_calls_budget(self.daily_free_calls)
                    reason = f"Listing {listing.id} gives {budget} free calls a day; today's are used up."
        raise self._payment_required(listing, max_cost, reason)

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
                "free_calls_per_day": listing.free_calls_budget(self.daily_free_calls),
            }
        }
        if self.x402 is not None and self.x402.ready:
            # The x402 offer: PAYMENT-REQUIRED header (v2) and the v1 form in the body.
            return self.x402.required(listing, max_cost, message, extra=extra)
        return PaymentRequired(message, code="payment_required", extra=extra)
