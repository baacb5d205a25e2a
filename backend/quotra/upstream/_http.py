"""What the HTTP adapters share: the aiohttp session they send through, the JSON codec, an SSE
decoder, status → exception mapping, API-key redaction, and a base class that sends requests
and streams server-sent events."""

from __future__ import annotations

import email.utils
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio

from quotra.netguard import GuardedResolver, NetGuard, UnsafeUpstream

from .base import (
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)

JSONEncode = Callable[[Any], bytes]
JSONDecode = Callable[[bytes | str], Any]


def _load_codec() -> tuple[JSONEncode, JSONDecode, tuple[type[Exception], ...]]:
    # msgspec is several times faster than the stdlib at both ends; stdlib is the fallback.
    try:
        import msgspec
    except ImportError:  # pragma: no cover - msgspec is pinned in requirements.lock
        import json

        def encode(obj: Any) -> bytes:
            return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

        return encode, json.loads, (ValueError,)
    return msgspec.json.Encoder().encode, msgspec.json.Decoder().decode, (msgspec.DecodeError,)


json_dumps, json_loads, JSON_ERRORS = _load_codec()

MAX_UPSTREAM_MESSAGE = 500
# How long to wait for the end of a body after its terminator event before closing instead.
DRAIN_SECONDS = 0.5
CONNECT_SECONDS = 10.0
MAX_CONNECTIONS = 1000


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------


def create_session(*, timeout: float, guard: NetGuard) -> aiohttp.ClientSession:
    """The one client session every upstream adapter sends through; call it inside the running
    loop and close it when done.

    `timeout` (seconds) bounds getting a connection and each read, not a whole answer, so a
    stream may run longer as long as it flows; a new connection must also be up within 10 s.
    Every name is resolved through `guard` (see `GuardedResolver`). No redirects (the adapters
    ask for none), no cookies, no proxies or credentials from the environment.
    """
    connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, resolver=GuardedResolver(guard), ttl_dns_cache=10)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=CONNECT_SECONDS, sock_read=timeout
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
        trust_env=False,
    )


# --------------------------------------------------------------------------------------------
# Server-sent events
# --------------------------------------------------------------------------------------------

_LINE_END = re.compile(rb"\r\n?|\n")


class LineSplitter:
    """Splits a `text/event-stream` body, as it arrives in chunks, into UTF-8 lines ended by CRLF,
    LF or CR, however long a line is.

    A line is decoded only once it is complete: UTF-8 never uses the bytes of CR or LF inside a
    character, so a character split across chunks is whole by then.
    """

    __slots__ = ("_after_cr", "_partial")

    def __init__(self) -> None:
        self._partial: list[bytes] = []  # the pieces of a line not yet ended
        self._after_cr = False  # the last chunk ended with CR: a LF opening the next one ends nothing

    def feed(self, chunk: bytes) -> list[str]:
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._after_cr = chunk[-1:] == b"\r"
        pieces = _LINE_END.split(chunk)
        if len(pieces) == 1:
            self._partial.append(chunk)
            return []
        if self._partial:
            self._partial.append(pieces[0])
            pieces[0] = b"".join(self._partial)
            self._partial = []
        rest = pieces.pop()
        if rest:
            self._partial.append(rest)
        return [piece.decode("utf-8", "replace") for piece in pieces]


@dataclass(slots=True)
class SSEEvent:
    event: str
    data: str


class SSEDecoder:
    """Incremental decoder for `text/event-stream` lines (terminators already stripped).

    Follows the WHATWG rules that matter for API streams: `data:` lines of one event are joined
    with newlines, lines starting with `:` are comments, one space after the colon is dropped,
    an event is dispatched on a blank line, and one without data is dropped. `id:`/`retry:`
    mean nothing for a one-shot API response and are ignored.
    """

    __slots__ = ("_data", "_event")

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""

    def feed(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent(self._event or "message", "\n".join(self._data))
            self._data = []
            self._event = ""
            return event
        if line[0] == ":":
            return None
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

_KEY_RUN = 10


def redact(text: str, secret: str) -> str:
    """Remove `secret` from `text`, and any run of 10+ of its characters (a half-masked echo)."""
    if not secret or not text:
        return text
    if secret in text:
        text = text.replace(secret, "[redacted]")
    if len(secret) > _KEY_RUN:
        for i in range(len(secret) - _KEY_RUN + 1):
            piece = secret[i : i + _KEY_RUN]
            if piece in text:
                text = text.replace(piece, "[redacted]")
    return text


def clip(text: str, limit: int = MAX_UPSTREAM_MESSAGE) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from `retry-after-ms` (OpenAI) or `retry-after` (seconds or HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_for_status(
    status: int,
    message: str,
    *,
    provider: str,
    error_type: str | None = None,
    retry_after: float | None = None,
) -> UpstreamError:
    """Map an upstream HTTP status to the exception class the relay acts on."""
    kwargs: dict[str, Any] = {"status_code": status, "provider": provider, "error_type": error_type}
    if status in (401, 403):
        return UpstreamAuthError(message, **kwargs)
    if status == 429:
        # OpenAI's 429 `insufficient_quota` means the key's balance is gone: waiting won't help.
        retryable = error_type not in ("insufficient_quota", "billing_hard_limit_reached")
        return UpstreamRateLimited(message, retry_after=retry_after, retryable=retryable, **kwargs)
    if status == 408:
        return UpstreamUnavailable(message, **kwargs)
    if status == 402:
        # The provider's account can't pay; not the client's fault and not going to clear soon.
        return UpstreamUnavailable(message, retryable=False, **kwargs)
    if 400 <= status < 500:
        return UpstreamBadRequest(message, **kwargs)
    return UpstreamUnavailable(message, **kwargs)


def error_fields(payload: Any, fallback: str) -> tuple[str, str | None]:
    """(message, type) from the `{"error": {"message", "type"|"status"|"code"}}` shapes all three
    providers use, with fallbacks for the plainer bodies OpenAI-compatible servers send."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            message = error.get("message")
            kind = error.get("code") or error.get("type") or error.get("status")
            # OpenAI: prefer the specific code (`invalid_api_key`) over the generic type.
            if isinstance(error.get("code"), int):
                kind = error.get("status") or error.get("type")
            return (
                str(message) if message is not None else fallback,
                str(kind) if kind is not None else None,
            )
        if isinstance(error, str):
            return error, None
        for key in ("message", "detail"):
            if isinstance(payload.get(key), str):
                return payload[key], None
    return fallback, None


# What a request can fail with before or while its answer arrives: aiohttp's errors (its
# timeouts are `TimeoutError`s too) and the guard refusing the address.
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, UnsafeUpstream)


def transport_error(exc: Exception, provider: str, api_key: str) -> UpstreamUnavailable:
    if isinstance(exc, UnsafeUpstream):
        return UpstreamUnavailable(
            f"{provider} upstream address refused: {exc.message}", provider=provider, retryable=False
        )
    if isinstance(exc, TimeoutError):
        return UpstreamUnavailable(
            f"{provider} upstream timed out ({type(exc).__name__})", status_code=504, provider=provider
        )
    detail = clip(redact(str(exc), api_key), 200) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"could not connect to {provider} upstream: {detail}", provider=provider)
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return UpstreamUnavailable(
            f"{provider} upstream URL is invalid: {detail}", provider=provider, retryable=False
        )
    return UpstreamUnavailable(f"{provider} upstream connection failed: {detail}", provider=provider)


# --------------------------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------------------------


class HTTPAdapter(ABC):
    """Sends JSON to one provider and maps every failure to an `UpstreamError`.

    Exceptions are raised outside `except` blocks on purpose: a chained aiohttp exception can
    carry the request (`request_info`), and with it the API key in its headers.
    """

    kind: str

    def __init__(self, *, session: aiohttp.ClientSession) -> None:
        self._session = session

    @abstractmethod
    def _headers(self, api_key: str) -> dict[str, str]:
        """The upstream's headers for `api_key`, `content-type: application/json` among them."""

    def _classify(self, status: int, payload: Any) -> int:
        """The status to map by; Gemini overrides it (a bad key there is a 400)."""
        return status

    def _retry_after(self, headers: Mapping[str, str], payload: Any) -> float | None:
        return parse_retry_after(headers)

    def _error(self, response: aiohttp.ClientResponse, content: bytes, api_key: str) -> UpstreamError:
        status = response.status
        try:
            payload: Any = json_loads(content)
        except JSON_ERRORS:
            payload = None
        fallback = content.decode("utf-8", "replace") or response.reason or ""
        upstream_message, error_type = error_fields(payload, fallback)
        message = f"{self.kind} upstream answered {status}: {clip(redact(upstream_message, api_key))}"
        error = error_for_status(
            self._classify(status, payload),
            message,
            provider=self.kind,
            error_type=error_type,
            retry_after=self._retry_after(response.headers, payload),
        )
        error.status_code = status  # classified by meaning, but report what the upstream said
        return error

    def _invalid_json(self) -> UpstreamUnavailable:
        return UpstreamUnavailable(f"{self.kind} upstream sent invalid JSON", provider=self.kind)

    async def _post_json(self, url: str, body: dict[str, Any], api_key: str) -> dict[str, Any]:
        failure: UpstreamError
        try:
            async with self._session.post(
                url, data=json_dumps(body), headers=self._headers(api_key), allow_redirects=False
            ) as response:
                content = await response.read()
        except TRANSPORT_ERRORS as exc:
            failure = transport_error(exc, self.kind, api_key)
        else:
            if response.status >= 300:
                raise self._error(response, content, api_key)
            try:
                data = json_loads(content)
            except JSON_ERRORS:
                data = None
            if isinstance(data, dict):
                return data
            failure = self._invalid_json()
        raise failure

    async def _get(self, url: str, api_key: str) -> None:
        failure: UpstreamError
        try:
            async with self._session.get(
                url, headers=self._headers(api_key), allow_redirects=False
            ) as response:
                content = await response.read()  # read, so the connection goes back to the pool
        except TRANSPORT_ERRORS as exc:
            failure = transport_error(exc, self.kind, api_key)
        else:
            if response.status < 300:
                return
            failure = self._error(response, content, api_key)
        raise failure

    async def _events(
        self, url: str, body: dict[str, Any], api_key: str, finished: Callable[[], bool] = lambda: False
    ) -> AsyncGenerator[SSEEvent, None]:
        """POST `body` and yield its SSE events; closing this iterator closes the upstream response.

        Once `finished()` turns true after an event, the rest of the body is read (briefly) so
        the connection goes back to the pool instead of being torn down.
        """
        failure: UpstreamError | None = None
        try:
            async with self._session.post(
                url, data=json_dumps(body), headers=self._headers(api_key), allow_redirects=False
            ) as response:
                if response.status >= 300:
                    raise self._error(response, await response.read(), api_key)
                lines = LineSplitter()
                decoder = SSEDecoder()
                async for chunk in response.content.iter_any():
                    for line in lines.feed(chunk):
                        event = decoder.feed(line)
                        if event is not None:
                            yield event
                            if finished():
                                await _drain(response.content)
                                return
                # An incomplete last event (no blank line) is dropped: the stream broke off, and
                # the adapters notice the missing terminator.
        except TRANSPORT_ERRORS as exc:
            failure = transport_error(exc, self.kind, api_key)
        if failure is not None:
            raise failure

    def _broken(self, why: str) -> UpstreamUnavailable:
        return UpstreamUnavailable(f"{self.kind} upstream stream {why}", provider=self.kind)

    def _decode_event(self, data: str) -> Any:
        try:
            return json_loads(data)
        except JSON_ERRORS:
            raise self._invalid_json() from None


async def _drain(content: aiohttp.StreamReader) -> None:
    with anyio.move_on_after(DRAIN_SECONDS):
        try:
            while await content.readany():
                pass
        except aiohttp.ClientError:
            pass  # the answer is complete; a reset after it changes nothing


def now() -> int:
    return int(time.time())
