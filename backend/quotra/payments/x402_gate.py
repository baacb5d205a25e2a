"""x402 on the paid-call path: the `402` offer, then verify → reserve → (serve) → capture | void.

The relay is its own facilitator: nothing here calls a remote one. Verification is
`quotra.payments.x402.verify` (no I/O), then two chain reads run together (the payer's USDC
balance, cached for a moment, and whether USDC already marks the nonce used), then the
(payer, nonce) is reserved by one atomic INSERT that also checks the balance against the payer's
other unsettled authorizations. A refusal anywhere is a `402` with a fresh offer naming the
reason; nothing is reserved and the upstream is never called.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

from eth_utils import to_checksum_address
from x402.http.constants import PAYMENT_REQUIRED_HEADER

from quotra.errors import PaymentRequired, ServiceUnavailable
from quotra.metrics import Metrics
from quotra.payments import x402
from quotra.payments.receipts import HEADER as RECEIPT_HEADER
from quotra.payments.receipts import ReceiptSigner
from quotra.store.payments_repo import (
    InsufficientFunds,
    NonceAlreadyReserved,
    PaymentsRepo,
    settlement_id,
)
from quotra.store.repositories import ListingRecord
from quotra.upstream.base import Usage

if TYPE_CHECKING:
    from quotra.chain.client import EscrowClient

log = logging.getLogger("quotra.x402")
T = TypeVar("T")
_OFFER_CACHE_MAX: Final = 4096


def usdc(atomic: int) -> str:
    whole, frac = divmod(atomic, 10**6)
    return f"{whole}.{frac:06d}"


@dataclass(frozen=True)
class X402Attempt:
    """The payment a request carried: decoded, or why it could not be, and the body's hash."""

    paid: x402.PaidRequest | None
    error: x402.X402Error | None
    request_hash: str

    @classmethod
    def from_request(cls, headers: Mapping[str, str], body: bytes) -> X402Attempt | None:
        """None when the request carries no payment header at all."""
        try:
            paid = x402.decode(headers)
        except x402.X402Error as exc:
            return cls(None, exc, hashlib.sha256(body).hexdigest())
        if paid is None:
            return None
        return cls(paid, None, hashlib.sha256(body).hexdigest())


class X402Required(PaymentRequired):
    """A `402` with an x402 offer: the `PAYMENT-REQUIRED` header (v2) and, in the body, the v1
    form (`x402Version: 1`, `accepts`) beside the OpenAI-style `error` object."""

    def __init__(
        self, message: str, *, header: str, v1_body: dict[str, Any], code: str, extra: dict[str, Any]
    ) -> None:
        super().__init__(message, code=code, headers={PAYMENT_REQUIRED_HEADER: header}, extra=extra)
        self.v1_body = v1_body

    def body(self) -> dict[str, Any]:
        body = super().body()
        body.update((k, v) for k, v in self.v1_body.items() if k != "error")
        return body


class X402Gate:
    """Built at start; `configure` plugs in the chain once the USDC domain was read from it."""

    name = "x402"

    def __init__(
        self,
        repo: PaymentsRepo,
        metrics: Metrics,
        *,
        public_url: str,
        balance_ttl: float = 2.0,
    ) -> None:
        self.repo = repo
        self.metrics = metrics
        self.resource = f"{public_url}/v1/chat/completions"
        self.balance_ttl = balance_ttl
        self.terms: x402.PaymentTerms | None = None
        self.chain: EscrowClient | None = None
        self.receipts: ReceiptSigner | None = None
        self.refund: Callable[[int], Awaitable[Any]] | None = None
        self._offers: dict[tuple[str, int, str | None], tuple[str, dict[str, Any]]] = {}
        self._balances: dict[str, tuple[float, int]] = {}
        self._inflight: dict[tuple[str, ...], asyncio.Future[Any]] = {}

    def configure(
        self, chain: EscrowClient, terms: x402.PaymentTerms, receipts: ReceiptSigner | None = None
    ) -> None:
        self.chain, self.terms, self.receipts = chain, terms, receipts
        self._offers.clear()

    @property
    def ready(self) -> bool:
        return self.terms is not None and self.chain is not None

    # ---- the offer ------------------------------------------------------------------------------

    def _offer(self, listing: ListingRecord, amount: int, reason: str | None) -> tuple[str, dict[str, Any]]:
        key = (listing.id, amount, reason)
        offer = self._offers.get(key)
        if offer is None:
            assert self.terms is not None
            if len(self._offers) >= _OFFER_CACHE_MAX:
                self._offers.clear()
            offer = x402.payment_required(
                self.terms,
                amount,
                resource=self.resource,
                description=f"One chat completion by Quotra listing {listing.id}",
                error=reason,
            )
            self._offers[key] = offer
        return offer

    def required(
        self,
        listing: ListingRecord,
        amount: int,
        message: str,
        *,
        reason: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> X402Required:
        header, v1_body = self._offer(listing, amount, reason)
        return X402Required(
            message, header=header, v1_body=v1_body, code=reason or "payment_required", extra=extra or {}
        )

    def refused(self, listing: ListingRecord, amount: int, error: x402.X402Error) -> X402Required:
        self.metrics.x402_payments.labels(error.reason).inc()
        return self.required(
            listing,
            amount,
            f"Payment refused ({error.reason}): {error.message}. Nothing was charged; sign a new "
            f"payment of exactly {usdc(amount)} USDC from the PAYMENT-REQUIRED header.",
            reason=error.reason,
        )

    # ---- chain reads, shared by concurrent requests ---------------------------------------------

    async def _shared(self, key: tuple[str, ...], read: Callable[[], Awaitable[T]]) -> T:
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(read())
            self._inflight[key] = future
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    async def balance(self, payer: str) -> int:
        cached = self._balances.get(payer)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.balance_ttl:
            return cached[1]
        assert self.chain is not None
        chain = self.chain
        value = await self._shared(("balance", payer), lambda: chain.usdc_balance(payer))
        self._balances[payer] = (now, value)
        return value

    def forget_balance(self, payer: str) -> None:
        """Called when a payment of `payer` settled: its balance changed."""
        self._balances.pop(payer, None)

    # ---- authorize --------------------------------------------------------------------------------

    async def authorize(self, attempt: X402Attempt, listing: ListingRecord, amount: int) -> X402Authorization:
        if not self.ready:
            raise PaymentRequired(
                "This relay does not take x402 payments right now (its chain is not configured or "
                "not reachable). Nothing was charged.",
                code="x402_unavailable",
            )
        assert self.terms is not None and self.chain is not None
        if attempt.error is not None:
            raise self.refused(listing, amount, attempt.error)
        assert attempt.paid is not None
        try:
            auth = x402.verify(attempt.paid, self.terms, amount, int(time.time()))
        except x402.X402Error as exc:
            raise self.refused(listing, amount, exc) from None
        chain = self.chain
        try:
            used, balance = await asyncio.gather(
                self._shared(
                    ("nonce", auth.payer, auth.nonce_hex),
                    lambda: chain.authorization_used(auth.payer, auth.nonce),
                ),
                self.balance(auth.payer),
            )
        except Exception as exc:
            log.warning("x402 chain check failed", extra={"error": type(exc).__name__})
            raise ServiceUnavailable(
                "The payment could not be checked on-chain right now; nothing was charged. Retry shortly.",
                code="payment_verification_unavailable",
            ) from exc
        if used:
            raise self.refused(
                listing, amount, x402.X402Error(x402.NONCE_ALREADY_USED, "USDC already marks this nonce used")
            )
        try:
            payment_id = await self.repo.reserve_x402(
                payer=auth.payer,
                nonce=auth.nonce_hex.lower(),
                amount=auth.value,
                valid_after=auth.valid_after,
                valid_before=auth.valid_before,
                signature=auth.signature.hex,
                listing_id=listing.id,
                provider=to_checksum_address(listing.owner),
                balance=balance,
            )
        except NonceAlreadyReserved:
            raise self.refused(
                listing,
                amount,
                x402.X402Error(x402.NONCE_ALREADY_USED, "this authorization was already used"),
            ) from None
        except InsufficientFunds:
            raise self.refused(
                listing,
                amount,
                x402.X402Error(
                    x402.INSUFFICIENT_BALANCE,
                    f"the payer's USDC balance does not cover {usdc(amount)} USDC on top of its "
                    "payments not settled yet",
                ),
            ) from None
        self.metrics.x402_payments.labels("reserved").inc()
        return X402Authorization(
            self,
            payment_id,
            attempt.paid.version,
            auth.payer,
            auth.value,
            listing.id,
            listing.owner,
            attempt.request_hash,
        )


@dataclass
class X402Authorization:
    """One reserved x402 payment, as the relay's call path sees it."""

    x: X402Gate
    payment_id: int
    version: int
    payer: str
    amount: int
    listing_id: str
    provider: str
    request_hash: str
    gate: str = "x402"
    status: str = field(default="reserved")

    @property
    def settlement(self) -> str:
        return settlement_id(self.payment_id)

    async def capture(self, cost_atomic: int) -> None:
        # `exact` pays the offered amount (a per-token listing's maximum cost), whatever was used.
        row = await self.x.repo.capture_x402(self.payment_id)
        if row is not None:
            self.status = "captured"
            self.x.metrics.x402_payments.labels("captured").inc()

    async def void(self) -> None:
        row = await self.x.repo.void_x402(self.payment_id)
        if row is not None:
            self.status = "voided"
            self.x.metrics.x402_payments.labels("voided").inc()
            return
        current = await self.x.repo.get_x402(self.payment_id)
        if current is not None and current.status in ("settled", "reconciled") and self.x.refund is not None:
            # Settled before the call failed: the consumer gets the money back from the escrow.
            await self.x.refund(self.payment_id)
            self.status = "refunded"

    def _settle_response(self) -> str:
        assert self.x.terms is not None
        status = "pending" if self.status in ("reserved", "captured") else self.status
        return x402.settle_response(
            success=self.status in ("reserved", "captured"),
            payer=self.payer,
            network=self.x.terms.network if self.version == 2 else (self.x.terms.v1_network or ""),
            transaction="",
            amount=self.amount,
            settlement=self.settlement,
            extra={"settlement": self.settlement, "status": status},
        )

    def receipt(self, usage: Usage | None, model: str) -> str | None:
        if self.x.receipts is None or self.x.terms is None or usage is None:
            return None
        return self.x.receipts.sign(
            {
                "call": self.settlement,
                "listing": self.listing_id,
                "model": model,
                "request": "sha256:" + self.request_hash,
                "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
                "price": str(self.amount),
                "asset": self.x.terms.asset,
                "network": self.x.terms.network,
                "payer": self.payer,
                "provider": self.provider,
                "payTo": self.x.terms.pay_to,
                "iat": int(time.time()),
            }
        )

    def response_headers(self, usage: Usage | None, model: str) -> dict[str, str]:
        """`PAYMENT-RESPONSE` (v2) or `X-PAYMENT-RESPONSE` (v1), and the signed receipt once the
        usage is known. Settlement is asynchronous: `transaction` is "" and `settlement` names
        the payment at `GET /v1/settlements/{id}`."""
        headers = {x402.RESPONSE_HEADERS[self.version]: self._settle_response()}
        receipt = self.receipt(usage, model) if self.status == "captured" else None
        if receipt is not None:
            headers[RECEIPT_HEADER] = receipt
        return headers

    def settlement_event(self, usage: Usage | None, model: str) -> dict[str, Any]:
        """What the last event of a paid stream says about the payment (see `quotra.services.relay`)."""
        assert self.x.terms is not None
        event: dict[str, Any] = {
            "object": "quotra.settlement",
            "settlement": self.settlement,
            "status": "pending" if self.status == "captured" else self.status,
            "charged": self.status == "captured",
            "amount": str(self.amount),
            "payer": self.payer,
            "network": self.x.terms.network,
            "transaction": "",
        }
        receipt = self.receipt(usage, model) if self.status == "captured" else None
        if receipt is not None:
            event["receipt"] = receipt
        return event
