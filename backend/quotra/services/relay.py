"""The call path of `POST /v1/chat/completions`.

resolve listings → rate limits → per listing: input limits, reserve the call (the gate: one
transaction for the listing's quota, the budget and the call's row) → upstream call → finish (one
transaction: capture with usage) or void (nothing charged). When the model names a model rather
than a listing, a refused or failing listing falls through to the next best one. Every answer
names its call (`Quotra-Call-Id`); a call whose finish could not be recorded is answered with an
error and charged nothing (its reservation is voided, by the sweeper if need be).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio

from quotra.calls.store import CallStore, Served
from quotra.errors import (
    BadRequest,
    InputTooLarge,
    NotFound,
    PaymentRequired,
    QuotaExhausted,
    QuotraError,
    RateLimited,
    ServiceUnavailable,
    UpstreamFailed,
)
from quotra.logging import scrub
from quotra.metrics import Metrics
from quotra.ratelimit import Decision, TokenBucketLimiter
from quotra.services.gate import Caller, PaymentGate, Reservation
from quotra.services.listings import ListingCache, ListingService, is_usable
from quotra.services.upstreams import AdapterRegistry
from quotra.store.models import utcnow
from quotra.store.repositories import ListingRecord, Store
from quotra.upstream.base import (
    Adapter,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamRateLimited,
    Usage,
)

log = logging.getLogger("quotra.relay")
LISTING_PREFIX = "listing/"
MAX_ATTEMPTS = 3
CALL_HEADER = "Quotra-Call-Id"


def input_chars(messages: list[dict[str, Any]]) -> int:
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    text = part.get("text")
                    total += len(text) if isinstance(text, str) else len(json.dumps(part))
        for key in ("tool_calls", "function_call"):
            if message.get(key):
                total += len(json.dumps(message[key]))
    return total


def estimate_tokens(chars: int, messages: int) -> int:
    # ~4 characters per token plus per-message framing; cheap and deliberately generous.
    return math.ceil(chars / 4) + 4 * messages


def call_cost(listing: ListingRecord, prompt_tokens: int, completion_tokens: int) -> int:
    cost = listing.price_per_call
    if listing.price_input_per_mtok:
        cost += math.ceil(prompt_tokens * listing.price_input_per_mtok / 1_000_000)
    if listing.price_output_per_mtok:
        cost += math.ceil(completion_tokens * listing.price_output_per_mtok / 1_000_000)
    return cost


@dataclass
class Target:
    """What a request asked for: a model (any listing may serve it) or one listing."""

    model: str | None
    listing_id: str | None

    @classmethod
    def parse(cls, name: str) -> Target:
        if name.startswith(LISTING_PREFIX):
            rest = name[len(LISTING_PREFIX) :]
            listing_id, _, model = rest.partition("/")
            if not listing_id:
                raise BadRequest("model 'listing/<id>' needs a listing id", param="model")
            return cls(model or None, listing_id)
        return cls(name, None)


@dataclass
class Prepared:
    listing: ListingRecord
    adapter: Adapter
    api_key: str
    model: str
    body: dict[str, Any]
    reservation: Reservation
    max_cost: int
    started: float
    rate: Decision | None = None
    prompt_tokens: int = 0  # estimated from the input: what a stream cut short is charged for


def _sandboxed(caller: Caller, listing: ListingRecord) -> bool:
    """A sandbox key's call on a live listing: the relay's sandbox answers it, so it touches none
    of the listing's limits (its requests per minute, its cooldown)."""
    return caller.api_key is not None and not caller.api_key.live and listing.kind != "sandbox"


class CallNotRecorded(ServiceUnavailable):
    """The upstream answered, but the call could not be recorded: it is not charged."""

    code = "call_not_recorded"


class Relay:
    def __init__(
        self,
        *,
        store: Store,
        calls: CallStore,
        cache: ListingCache,
        listings: ListingService,
        adapters: AdapterRegistry,
        gate: PaymentGate,
        limiter: TokenBucketLimiter,
        metrics: Metrics,
        consumer_rate_per_minute: int,
        cooldown_after_failures: int,
        cooldown_seconds: float,
    ) -> None:
        self.store = store
        self.calls = calls
        self.cache = cache
        self.listings = listings
        self.adapters = adapters
        self.gate = gate
        self.limiter = limiter
        self.metrics = metrics
        self.consumer_rate = consumer_rate_per_minute
        self.cooldown_after = cooldown_after_failures
        self.cooldown = timedelta(seconds=cooldown_seconds)
        self._failing: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()

    # ---- choosing listings -----------------------------------------------------------------------

    async def candidates(self, target: Target) -> list[ListingRecord]:
        now = utcnow()
        if target.listing_id is not None:
            record = await self.cache.get(target.listing_id)
            if record is None or record.status == "revoked":
                raise NotFound(
                    f"The listing '{target.listing_id}' does not exist", param="model", code="model_not_found"
                )
            if target.model is not None and target.model not in record.models:
                raise NotFound(
                    f"Listing '{record.id}' does not serve model '{target.model}'",
                    param="model",
                    code="model_not_found",
                )
            if record.status != "active":
                raise NotFound(f"Listing '{record.id}' is paused", param="model", code="listing_unavailable")
            if record.expires_at is not None and record.expires_at <= now:
                raise NotFound(
                    f"Listing '{record.id}' has expired", param="model", code="listing_unavailable"
                )
            if record.in_cooldown(now):
                assert record.cooldown_until is not None
                retry = max(1, math.ceil((record.cooldown_until - now).total_seconds()))
                raise RateLimited(
                    f"Listing '{record.id}' is cooling down after upstream errors",
                    code="listing_cooldown",
                    headers={"Retry-After": str(retry)},
                )
            return [record]
        assert target.model is not None
        serving = [r for r in await self.cache.live() if target.model in r.models]
        if not serving:
            raise NotFound(
                f"The model '{target.model}' is not served by any live listing",
                param="model",
                code="model_not_found",
            )
        healthy = [r for r in serving if is_usable(r, now)]
        if not healthy:
            raise RateLimited(
                f"Every listing serving '{target.model}' is cooling down after upstream errors",
                code="listing_cooldown",
                headers={"Retry-After": str(int(self.cooldown.total_seconds()) or 1)},
            )
        healthy.sort(
            key=lambda r: (
                r.price_per_call,
                -(r.remaining_calls if r.remaining_calls is not None else 2**62),
                r.created_at,
            )
        )
        return healthy

    def _build_body(
        self, request: dict[str, Any], listing: ListingRecord, model: str
    ) -> tuple[dict[str, Any], int]:
        body = dict(request)
        body["model"] = model
        cap = listing.max_output_tokens
        wanted = body.get("max_completion_tokens") or body.get("max_tokens")
        if cap is not None:
            if body.get("max_completion_tokens") is not None:
                body["max_completion_tokens"] = min(body["max_completion_tokens"], cap)
                body.pop("max_tokens", None)
            else:
                body["max_tokens"] = min(wanted or cap, cap)
        out = body.get("max_completion_tokens") or body.get("max_tokens") or 4096
        return body, int(out)

    def _check_input(self, listing: ListingRecord, chars: int, tokens: int) -> None:
        if listing.max_input_chars is not None and chars > listing.max_input_chars:
            raise InputTooLarge(
                f"The input has {chars} characters; "
                f"listing '{listing.id}' accepts at most {listing.max_input_chars}",
                param="messages",
            )
        if listing.max_input_tokens is not None and tokens > listing.max_input_tokens:
            raise InputTooLarge(
                f"The input is about {tokens} tokens; "
                f"listing '{listing.id}' accepts at most {listing.max_input_tokens}",
                param="messages",
            )

    async def _prepare(
        self,
        caller: Caller,
        listing: ListingRecord,
        request: dict[str, Any],
        target: Target,
        chars: int,
        tokens: int,
    ) -> Prepared:
        self._check_input(listing, chars, tokens)
        rate = None
        if listing.rate_per_minute and not _sandboxed(caller, listing):
            rate = self.limiter.check(f"l:{listing.id}", listing.rate_per_minute, f"listing {listing.id}")
        model = target.model or listing.models[0]
        body, max_out = self._build_body(request, listing, model)
        max_cost = call_cost(listing, tokens, max_out)
        try:
            reservation = await self.gate.reserve(caller, listing, max_cost)
        except QuotaExhausted:
            self.cache.invalidate()
            raise
        try:
            if reservation.gate == "sandbox":  # test money: the relay's sandbox answers, never upstream
                api_key, adapter = "", self.adapters.get("sandbox")
            else:
                api_key = self.listings.api_key(listing)
                adapter = self.adapters.get(listing.kind, listing.base_url)
        except BaseException:
            await self._void(reservation, "error", "the listing's key could not be opened")
            raise
        return Prepared(
            listing, adapter, api_key, model, body, reservation, max_cost, time.monotonic(), rate, tokens
        )

    async def _void(self, reservation: Reservation, outcome: str, error: str | None = None) -> None:
        """Nothing is charged for this call. If the store cannot be reached the reservation stays
        until the sweeper voids it (still charging nothing)."""
        with anyio.CancelScope(shield=True):
            try:
                voided = await self.calls.void(reservation.call_id, outcome=outcome, error=error)
            except Exception:
                log.warning("void failed; the sweeper ends the call", extra={"call": reservation.call_id})
                return
        if voided and reservation.gate == "x402":
            self.metrics.x402_payments.labels("voided").inc()

    # ---- upstream errors -------------------------------------------------------------------------

    async def _upstream_failed(self, prepared: Prepared, exc: UpstreamError) -> QuotraError:
        listing = prepared.listing
        self.metrics.upstream_errors.labels(listing.kind, type(exc).__name__).inc()
        self.metrics.listing_calls.labels(listing.id, "upstream_error").inc()
        await self._void(prepared.reservation, "upstream_error", type(exc).__name__)
        simulated = prepared.reservation.gate == "sandbox" and listing.kind != "sandbox"
        if isinstance(exc, UpstreamAuthError | UpstreamRateLimited) and not simulated:
            self._failing.add(listing.id)
            cooled = await self.store.note_upstream_failure(
                listing.id, threshold=self.cooldown_after, cooldown=self.cooldown
            )
            if cooled:
                self.cache.invalidate()
                log.warning(
                    "listing in cooldown after repeated upstream refusals", extra={"listing": listing.id}
                )
        log.info(
            "upstream error",
            extra={
                "listing": listing.id,
                "error": type(exc).__name__,
                "status": getattr(exc, "status_code", 0),
            },
        )
        error = map_upstream_error(listing, exc)
        error.headers[CALL_HEADER] = prepared.reservation.call_id
        return error

    async def _succeeded(self, prepared: Prepared, usage: Usage, *, stream: bool, outcome: str = "ok") -> int:
        """Finishes a served call (one transaction); the amount charged. Raises `CallNotRecorded`
        (nothing charged) when the finish could not be written."""
        listing = prepared.listing
        reservation = prepared.reservation
        cost = call_cost(listing, usage.prompt_tokens, usage.completion_tokens)
        amount, markup = reservation.charge(cost), reservation.markup(cost)
        served = Served(
            prepared.model,
            stream,
            usage.prompt_tokens,
            usage.completion_tokens,
            int((time.monotonic() - prepared.started) * 1000),
            outcome,
        )
        try:
            finished = await self.calls.finish(
                reservation.call_id, amount=amount, markup=markup, usage=served
            )
        except Exception as exc:
            log.error("finish failed: nothing charged", extra={"call": reservation.call_id})
            await self._void(reservation, "error", "the call could not be recorded")
            raise CallNotRecorded(
                f"Call {reservation.call_id} was served but could not be recorded; nothing was charged. "
                "Retry shortly.",
                headers={CALL_HEADER: reservation.call_id, "Retry-After": "1"},
            ) from exc
        if not finished:  # voided meanwhile (its reservation expired): served, not charged
            log.warning("call finished after its reservation expired", extra={"call": reservation.call_id})
            amount = 0
        elif reservation.gate == "x402":
            self.metrics.x402_payments.labels("captured").inc()
        if listing.id in self._failing or listing.failure_streak:
            self._failing.discard(listing.id)
            await self.store.note_upstream_success(listing.id)
        self.metrics.listing_calls.labels(listing.id, outcome).inc()
        self.metrics.listing_tokens.labels(listing.id, "input").inc(usage.prompt_tokens)
        self.metrics.listing_tokens.labels(listing.id, "output").inc(usage.completion_tokens)
        return amount

    # ---- the call --------------------------------------------------------------------------------

    def _headers(self, prepared: Prepared, consumer_rate: Decision | None) -> dict[str, str]:
        """The answer's headers: `RateLimit-*` of the API key's own limit (shared by the replicas)
        if it has one, else of the relay's per-consumer limit."""
        rate = prepared.reservation.rate or consumer_rate
        headers = {} if rate is None else rate.headers()
        headers[CALL_HEADER] = prepared.reservation.call_id
        headers["X-Quotra-Listing"] = prepared.listing.id
        headers["X-Quotra-Payment"] = prepared.reservation.gate
        return headers

    async def _attempts(
        self, caller: Caller, request: dict[str, Any]
    ) -> AsyncGenerator[tuple[Prepared, Decision | None, bool]]:
        """Yields prepared (authorized, reserved) attempts in order until one is used."""
        target = Target.parse(str(request["model"]))
        candidates = await self.candidates(target)
        # An API key has its own limit, shared by the replicas (taken with its reservation).
        consumer_rate = (
            None
            if caller.api_key is not None
            else self.limiter.check(f"c:{caller.id}", self.consumer_rate, "this consumer")
        )
        messages = request["messages"]
        chars = input_chars(messages)
        tokens = estimate_tokens(chars, len(messages))
        routed = target.listing_id is None
        errors: list[QuotraError] = []
        attempts = 0
        for listing in candidates:
            if attempts >= MAX_ATTEMPTS:
                break
            try:
                prepared = await self._prepare(caller, listing, request, target, chars, tokens)
            except (InputTooLarge, RateLimited, PaymentRequired, QuotaExhausted) as exc:
                if not routed:
                    raise
                errors.append(exc)
                continue
            attempts += 1
            yield prepared, consumer_rate, routed
        if not errors:
            raise QuotaExhausted(f"No listing serving '{request['model']}' has calls left", param="model")
        payment = [e for e in errors if isinstance(e, PaymentRequired)]
        raise payment[0] if payment else errors[0]

    async def complete(
        self, caller: Caller, request: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        last: QuotraError | None = None
        attempts = self._attempts(caller, request)
        try:
            async for prepared, consumer_rate, routed in attempts:
                try:
                    completion = await prepared.adapter.complete(
                        prepared.body, api_key=prepared.api_key, model=prepared.model
                    )
                except UpstreamError as exc:
                    last = await self._upstream_failed(prepared, exc)
                    if routed and not isinstance(exc, UpstreamBadRequest):
                        continue
                    raise last from exc
                except BaseException:
                    await self._void(prepared.reservation, "cancelled")
                    raise
                charged = await self._succeeded(prepared, completion.usage, stream=False)
                headers = self._headers(prepared, consumer_rate)
                headers["X-Quotra-Cost"] = str(charged)
                answer = prepared.reservation.answer
                if answer is not None:
                    headers.update(answer.headers(completion.usage, prepared.model, charged))
                return completion.body, headers
        except (QuotaExhausted, RateLimited, PaymentRequired, InputTooLarge):
            if last is not None:
                raise last from None
            raise
        finally:
            await attempts.aclose()
        raise last or UpstreamFailed("No listing could serve the request")

    async def open_stream(
        self, caller: Caller, request: dict[str, Any]
    ) -> tuple[AsyncIterator[bytes], dict[str, str]]:
        """Starts the upstream stream and waits for its first chunk, so that failures before any
        output still become proper HTTP errors (and may fall through to another listing)."""
        last: QuotraError | None = None
        attempts = self._attempts(caller, request)
        try:
            async for prepared, consumer_rate, routed in attempts:
                upstream = prepared.adapter.stream(
                    prepared.body, api_key=prepared.api_key, model=prepared.model
                )
                iterator = aiter(upstream)
                try:
                    first = await anext(iterator)
                except StopAsyncIteration:
                    first = None
                except UpstreamError as exc:
                    await _aclose(iterator)
                    last = await self._upstream_failed(prepared, exc)
                    if routed and not isinstance(exc, UpstreamBadRequest):
                        continue
                    raise last from exc
                except BaseException:
                    await _aclose(iterator)
                    await self._void(prepared.reservation, "cancelled")
                    raise
                headers = self._headers(prepared, consumer_rate)
                answer = prepared.reservation.answer
                if answer is not None:
                    # Headers go first: the payment is pending, its charge not known yet; the
                    # stream's last event tells what was charged.
                    headers.update(answer.headers(None, prepared.model, None))
                options = request.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                return self._sse(prepared, iterator, first, include_usage=include_usage), headers
        except (QuotaExhausted, RateLimited, PaymentRequired, InputTooLarge):
            if last is not None:
                raise last from None
            raise
        finally:
            await attempts.aclose()
        raise last or UpstreamFailed("No listing could serve the request")

    async def _sse(
        self,
        prepared: Prepared,
        iterator: AsyncIterator[dict[str, Any]],
        first: dict[str, Any] | None,
        *,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        """The upstream's chunks as OpenAI sends them: the usage chunk (no choices) only when the
        client asked with `stream_options.include_usage` (usage is metered either way), and a paid
        call's outcome in the `quotra` field of the last chunk, which is held back until the call
        is finished. A client that hangs up pays for what it was sent: the upstream's usage if it
        came, else the prompt and the completion streamed so far (about 4 characters a token)."""
        usage: Usage | None = None
        failure: UpstreamError | None = None
        finished = False
        streamed_chars = 0
        tail: list[dict[str, Any]] = []  # the ending chunks (finish reason, usage), held back
        last: dict[str, Any] = {}
        try:
            chunk = first
            while chunk is not None:
                last = chunk
                if chunk.get("usage"):
                    usage = _usage_of(chunk["usage"])
                choices = chunk.get("choices") or []
                if not include_usage:
                    chunk.pop("usage", None)
                if not choices:
                    if include_usage:
                        tail.append(chunk)
                elif any(c.get("finish_reason") for c in choices):
                    tail.append(chunk)
                else:
                    for held in tail:  # content after the end (rare): send in order
                        yield _event(held)
                    tail.clear()
                    streamed_chars += sum(len((c.get("delta") or {}).get("content") or "") for c in choices)
                    yield _event(chunk)
                try:
                    chunk = await anext(iterator)
                except StopAsyncIteration:
                    chunk = None
            # Finished before [DONE], so that a paid stream can end with what happened to the payment.
            with anyio.CancelScope(shield=True):
                finished = True
                await _aclose(iterator)
                charged = await self._finish_stream(prepared, usage)
            answer = prepared.reservation.answer
            if answer is not None:
                event = answer.stream_event(usage, prepared.model, charged)
                if not tail:
                    tail.append(_empty_chunk(last))
                tail[-1]["quotra"] = event
            for held in tail:
                yield _event(held)
            yield b"data: [DONE]\n\n"
        except UpstreamError as exc:
            failure = exc
            error = map_upstream_error(prepared.listing, exc)
            yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
        except CallNotRecorded as exc:
            yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
        finally:
            # Runs on normal end, upstream failure and client disconnect (cancellation): close the
            # upstream request, then end the call, shielded from the cancellation. A failure before
            # any usage is not charged; a client that hung up pays for what it was sent.
            if not finished:
                with anyio.CancelScope(shield=True):
                    await _aclose(iterator)
                    if failure is not None and usage is None:
                        await self._upstream_failed(prepared, failure)
                    else:
                        sent = usage or Usage(prepared.prompt_tokens, math.ceil(streamed_chars / 4))
                        with contextlib.suppress(CallNotRecorded):
                            await self._finish_stream(prepared, sent, "cancelled")

    async def _finish_stream(self, prepared: Prepared, usage: Usage | None, outcome: str = "ok") -> int:
        return await self._succeeded(prepared, usage or Usage(0, 0), stream=True, outcome=outcome)


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _empty_chunk(last: dict[str, Any]) -> dict[str, Any]:
    """A chunk that adds nothing (one choice, an empty delta): where a paid call's outcome goes
    when the upstream's stream had no ending chunk to carry it. It has a choice so that the
    usual `chunk.choices[0].delta.content` loops read it as one more empty delta."""
    return {
        "id": last.get("id", "chatcmpl-quotra"),
        "object": "chat.completion.chunk",
        "created": last.get("created", 0),
        "model": last.get("model", ""),
        "choices": [{"index": 0, "delta": {}, "finish_reason": None}],
    }


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # closing a failed upstream stream must not mask the real outcome
            log.debug("upstream stream close failed", exc_info=True)


def _usage_of(raw: Any) -> Usage:
    if isinstance(raw, Usage):
        return raw
    return Usage(int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0))


def map_upstream_error(listing: ListingRecord, exc: UpstreamError) -> QuotraError:
    """Upstream failures as client errors. Upstream auth messages are never passed on: they
    can quote part of the provider's key."""
    if isinstance(exc, UpstreamAuthError):
        return UpstreamFailed(
            f"The upstream refused the provider key of listing '{listing.id}'; try another listing",
            code="upstream_auth_failed",
        )
    if isinstance(exc, UpstreamRateLimited):
        retry = exc.retry_after
        headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry else {}
        return RateLimited(
            f"The upstream of listing '{listing.id}' is rate limited; retry later",
            code="upstream_rate_limited",
            headers=headers,
        )
    if isinstance(exc, UpstreamBadRequest):
        message = scrub(str(getattr(exc, "message", "") or exc))[:500]
        return BadRequest(f"The upstream rejected the request: {message}", code="upstream_bad_request")
    return UpstreamFailed(
        f"The upstream of listing '{listing.id}' failed ({type(exc).__name__}); nothing was charged",
        code="upstream_unavailable",
    )
