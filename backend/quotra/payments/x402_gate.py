"""x402 on the paid-call path: the `402` offer, then verify → reserve → (serve) → finish | void.

The relay is its own facilitator: nothing here calls a remote one. Verification is
`quotra.payments.x402.verify` (no I/O); then the payer's USDC balance as of one known block (read
once per payer and block: a block's state never changes); then the call store reserves the
(payer, nonce) and the amount against that balance minus every authorization of the payer not
settled by that block, atomically, whichever replica serves. A refusal is a `402` with a fresh
offer naming the reason; nothing is reserved, the upstream is never called. A payment presented
again after its call answers with that call's outcome (`409`).

Whether USDC already marks the nonce used is not asked per call. Only the escrow can use the
authorization to receive it, and the store holds every (payer, nonce) the escrow was given, so
the one way the chain knows a nonce the store does not is its payer cancelling it (or moving the
money away) — which the payer can as well do a second after any check, before the batch lands.
What bounds that loss is the payer's record instead: an authorization USDC refuses at settlement
or that was used outside the escrow counts against its payer (`x402_payers.unpaid`), and such a
payer is refused from then on. A per-call `authorizationState` read would cost an RPC round trip
on every paid call and close no window.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar

from x402.http.constants import PAYMENT_REQUIRED_HEADER

from quotra.calls.records import CallView, Refused, X402Hold, summary
from quotra.calls.store import CallStore, Hold
from quotra.chain.addresses import checksum
from quotra.errors import PaymentRequired, QuotraError, ServiceUnavailable
from quotra.metrics import Metrics
from quotra.money import usdc
from quotra.payments import x402
from quotra.payments.receipts import HEADER as RECEIPT_HEADER
from quotra.payments.receipts import ReceiptSigner
from quotra.services.gate import Reservation, not_servable
from quotra.store.repositories import ListingRecord
from quotra.upstream.base import Usage

if TYPE_CHECKING:
    from quotra.chain.client import EscrowClient

log = logging.getLogger("quotra.x402")
T = TypeVar("T")
_OFFER_CACHE_MAX: Final = 4096
_BALANCE_CACHE_MAX: Final = 16_384
X402_RETRY_AFTER: Final = 2  # seconds: a chain read failed or the chain is not back yet


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


class PaymentAlreadyUsed(QuotraError):
    """`409`: this authorization already paid for a call; the body says what became of it."""

    status_code = 409
    type = "invalid_request_error"
    code = "payment_already_used"


class X402Gate:
    """Built at start; `configure` plugs in the chain once the USDC domain was read from it."""

    name = "x402"

    def __init__(self, calls: CallStore, metrics: Metrics, *, public_url: str, head_ttl: float = 1.0) -> None:
        self.calls = calls
        self.metrics = metrics
        self.resource = f"{public_url}/v1/chat/completions"
        self.head_ttl = head_ttl
        # Whether this relay takes x402 at all (it has a chain and an escrow), even while the
        # chain is out of reach.
        self.offered = False
        self.terms: x402.PaymentTerms | None = None
        self.chain: EscrowClient | None = None
        self.receipts: ReceiptSigner | None = None
        self._offers: dict[tuple[str, int, str | None], tuple[str, dict[str, Any]]] = {}
        self._head: tuple[float, int] | None = None
        self._balances: dict[tuple[str, int], int] = {}
        self._latest: dict[str, tuple[float, int, int]] = {}  # payer -> (read at, block, balance)
        self._inflight: dict[tuple[Any, ...], asyncio.Future[Any]] = {}
        self._refreshing: set[asyncio.Task[None]] = set()

    def configure(
        self, chain: EscrowClient, terms: x402.PaymentTerms, receipts: ReceiptSigner | None = None
    ) -> None:
        self.chain, self.terms, self.receipts = chain, terms, receipts
        self.offered = True
        self._offers.clear()
        self._head = None
        self._balances.clear()
        self._latest.clear()

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

    # ---- chain reads as of one block, shared by concurrent requests -----------------------------

    async def _shared(self, key: tuple[Any, ...], read: Callable[[], Awaitable[T]]) -> T:
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(read())
            self._inflight[key] = future
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    async def head(self) -> int:
        """The chain's latest block, read at most every `head_ttl` seconds."""
        now = time.monotonic()
        if self._head is not None and now - self._head[0] < self.head_ttl:
            return self._head[1]
        assert self.chain is not None
        chain = self.chain
        block = await self._shared(("head",), chain.block_number)
        if self._head is None or block >= self._head[1]:
            self._head = (now, block)
        return self._head[1]

    async def balance_at(self, payer: str, block: int) -> int:
        """The payer's USDC balance at `block`: fixed once the block exists, so cached."""
        cached = self._balances.get((payer, block))
        if cached is not None:
            return cached
        assert self.chain is not None
        chain = self.chain
        value = await self._shared(("balance", payer, block), lambda: chain.usdc_balance(payer, block))
        if len(self._balances) >= _BALANCE_CACHE_MAX:
            self._balances.clear()
            self._latest.clear()
        self._balances[(payer, block)] = value
        latest = self._latest.get(payer)
        if latest is None or block >= latest[1]:
            self._latest[payer] = (time.monotonic(), block, value)
        return value

    async def snapshot(self, payer: str) -> tuple[int, int]:
        """(balance, block): the payer's USDC balance as of a recent head block.

        When the head moved on, a payer whose balance was read within the last two `head_ttl`
        is checked against that snapshot while the read for the new head goes on in the
        background, instead of each payer's first call after every new head waiting on the node
        (a few ms from a local node, tens from a hosted RPC: 1 call in 20 of a busy payer, the
        tail of the x402 path's latency). The money stays as safe as the head cache makes it:
        the store keeps each payer's newest snapshot and holds every authorization not settled
        by that snapshot's block against it, so an older snapshot never counts a settlement
        twice; what it cannot see is USDC the payer moved away in the last seconds (at most
        three `head_ttl`), which the head cache already accepts for one, and such a payer's
        payment fails at settlement and the payer is refused from then on."""
        block = await self.head()
        cached = self._balances.get((payer, block))
        if cached is not None:
            return cached, block
        latest = self._latest.get(payer)
        if latest is not None and time.monotonic() - latest[0] < 2 * self.head_ttl:
            self._background(self.balance_at(payer, block))
            return latest[2], latest[1]
        return await self.balance_at(payer, block), block

    def _background(self, read: Awaitable[int]) -> None:
        async def run() -> None:
            try:
                await read
            except Exception as exc:  # the next call reads again, and answers 503 if it cannot
                log.info("x402 balance refresh failed", extra={"error": type(exc).__name__})

        task = asyncio.get_running_loop().create_task(run())
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    # ---- reserving ----------------------------------------------------------------------------------

    async def reserve(
        self, attempt: X402Attempt, listing: ListingRecord, amount: int, deadline: datetime
    ) -> Reservation:
        if not self.ready:
            raise ServiceUnavailable(
                "This relay cannot take x402 payments right now: its chain is not reachable. Nothing "
                "was charged; retry shortly, or pay with a prepaid API key.",
                code="x402_unavailable",
                headers={"Retry-After": str(X402_RETRY_AFTER)},
            )
        assert self.terms is not None and self.chain is not None
        if attempt.error is not None:
            raise self.refused(listing, amount, attempt.error)
        assert attempt.paid is not None
        try:
            auth = x402.verify(attempt.paid, self.terms, amount, int(time.time()))
        except x402.X402Error as exc:
            raise self.refused(listing, amount, exc) from None
        nonce = auth.nonce_hex.lower()
        try:
            balance, block = await self.snapshot(auth.payer)
        except Exception as exc:
            log.warning("x402 chain check failed", extra={"error": type(exc).__name__})
            raise ServiceUnavailable(
                "The payment could not be checked on-chain right now; nothing was charged. Retry shortly.",
                code="payment_verification_unavailable",
                headers={"Retry-After": str(X402_RETRY_AFTER)},
            ) from exc
        # Voided by the sweeper in time to be settled if it did finish, at the latest.
        settle_by = datetime.fromtimestamp(auth.valid_before - self.terms.settle_margin_seconds, UTC)
        hold = Hold(auth.payer, listing.id, checksum(listing.owner), auth.value, min(deadline, settle_by))
        x402_hold = X402Hold(
            payer=auth.payer,
            nonce=nonce,
            value=auth.value,
            valid_after=auth.valid_after,
            valid_before=auth.valid_before,
            signature=auth.signature.hex,
            request_hash=attempt.request_hash,
            balance=balance,
            block=block,
        )
        try:
            call_id = await self.calls.reserve_x402(hold, x402_hold)
        except Refused as refused:
            if refused.reason == "nonce_used":
                if refused.call is not None:
                    raise self.replayed(refused.call) from None
                raise self.refused(
                    listing,
                    amount,
                    x402.X402Error(x402.NONCE_ALREADY_USED, "this authorization was already used"),
                ) from None
            if refused.reason == "payer_unpaid":
                raise self.refused(
                    listing,
                    amount,
                    x402.X402Error(
                        x402.PAYER_UNPAID,
                        "an earlier authorization of this payer did not pay (USDC refused it at "
                        "settlement, or it was used outside the escrow): this relay takes no more "
                        "x402 payments from it; pay with a prepaid key instead",
                    ),
                ) from None
            if refused.reason == "insufficient_balance":
                raise self.refused(
                    listing,
                    amount,
                    x402.X402Error(
                        x402.INSUFFICIENT_BALANCE,
                        f"the payer's USDC balance does not cover {usdc(amount)} USDC on top of its "
                        "payments not settled yet",
                    ),
                ) from None
            raise not_servable(listing) from None
        self.metrics.x402_payments.labels("reserved").inc()
        answer = X402Answer(
            self,
            call_id,
            attempt.paid.version,
            auth.payer,
            auth.value,
            listing.id,
            listing.owner,
            attempt.request_hash,
        )
        # Charged what the call uses, at most the authorization: the escrow credits the rest to the
        # payer's deposit when it settles the payment.
        return Reservation(call_id, "x402", auth.value, answer=answer)

    def replayed(self, call: CallView) -> PaymentAlreadyUsed:
        self.metrics.x402_payments.labels("replayed").inc()
        charged = "it was charged once" if call.charged else "nothing was charged"
        return PaymentAlreadyUsed(
            f"This payment already paid for call {call.id} ({call.state}; {charged}). It is not served "
            f"again: GET /v1/calls/{call.id} tells what happened; sign a new payment for a new call.",
            headers={"Quotra-Call-Id": call.id},
            extra={"call": summary(call)},
        )

    def payer_of(self, headers: Mapping[str, str]) -> x402.Authorization | None:
        """The authorization a request's payment header carries, if its payer signed it (for a
        payer asking about a call it paid for); None without a valid one."""
        if self.terms is None:
            return None
        try:
            paid = x402.decode(headers)
            return None if paid is None else x402.signed_authorization(paid, self.terms)
        except x402.X402Error:
            return None


@dataclass(frozen=True)
class X402Answer:
    """What a call paid with x402 answers about its payment: the authorized `amount`, what the
    call was charged of it, and the rest, which the escrow credits to the payer's deposit."""

    x: X402Gate
    call_id: str
    version: int
    payer: str
    amount: int
    listing_id: str
    provider: str
    request_hash: str

    def charges(self, charged: int) -> dict[str, str]:
        """Beside a charge: the amount authorized, and the rest the escrow returns to the payer's
        deposit when it settles (nothing when nothing was charged: the authorization is unused)."""
        return {
            "authorized": str(self.amount),
            "returned_to_deposit": str(self.amount - charged) if charged else "0",
        }

    def _settle_response(self, charged: int | None) -> str:
        """`amount` is what was charged; while a stream runs (`charged` None) only the
        authorization is known."""
        assert self.x.terms is not None
        extra: dict[str, Any] = {"call": self.call_id, "status": "pending" if charged != 0 else "voided"}
        extra.update(self.charges(charged) if charged is not None else {"authorized": str(self.amount)})
        return x402.settle_response(
            success=charged != 0,
            payer=self.payer,
            network=self.x.terms.network if self.version == 2 else (self.x.terms.v1_network or ""),
            transaction="",
            amount=charged,
            call=self.call_id,
            extra=extra,
        )

    def receipt(self, usage: Usage | None, model: str, charged: int) -> str | None:
        if self.x.receipts is None or self.x.terms is None or usage is None:
            return None
        return self.x.receipts.sign(
            {
                "call": self.call_id,
                "listing": self.listing_id,
                "model": model,
                "request": "sha256:" + self.request_hash,
                "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
                "price": str(charged),
                **self.charges(charged),
                "asset": self.x.terms.asset,
                "network": self.x.terms.network,
                "payer": self.payer,
                "provider": self.provider,
                "payTo": self.x.terms.pay_to,
                "iat": int(time.time()),
            }
        )

    def headers(self, usage: Usage | None, model: str, charged: int | None) -> dict[str, str]:
        """`PAYMENT-RESPONSE` (v2) or `X-PAYMENT-RESPONSE` (v1), and the signed receipt once the
        usage is known. Settlement is asynchronous: `transaction` is "" and `call` names the call
        at `GET /v1/calls/{id}`, which shows its settlement transaction once there is one."""
        headers = {x402.RESPONSE_HEADERS[self.version]: self._settle_response(charged)}
        receipt = self.receipt(usage, model, charged) if charged else None
        if receipt is not None:
            headers[RECEIPT_HEADER] = receipt
        return headers

    def stream_event(self, usage: Usage | None, model: str, charged: int) -> dict[str, Any]:
        """What the last event of a paid stream says about the payment (see `quotra.services.relay`):
        `amount` is what was charged."""
        assert self.x.terms is not None
        event: dict[str, Any] = {
            "object": "quotra.payment",
            "call": self.call_id,
            "status": "pending" if charged else "voided",
            "charged": charged > 0,
            "amount": str(charged),
            **self.charges(charged),
            "payer": self.payer,
            "network": self.x.terms.network,
            "transaction": "",
        }
        receipt = self.receipt(usage, model, charged) if charged else None
        if receipt is not None:
            event["receipt"] = receipt
        return event
