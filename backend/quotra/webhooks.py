"""Ed25519 webhooks from the gas relayer: signing (the local relayer) and verification (the relay).

Two wire formats are accepted, both signed with Ed25519 keys published as a JWKS
(`{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid", "x": base64url}]}`):

* 1Shot: the body is `{apiVersion, type, data, timestamp, keyId, signature}`; the signature
  (standard base64, 64 bytes) covers the body without `signature`, serialised as compact JSON
  with sorted keys, UTF-8, non-ASCII not escaped (`canonical_json`). The key is the JWKS entry
  whose `kid` is `keyId` (several entries may share a kid: each is tried).
* Standard Webhooks: headers `webhook-id`, `webhook-timestamp`, `webhook-signature` (a
  space-separated list of `v1a,<base64 signature>`) over `"{id}.{timestamp}.{body}"`; the body is
  the same envelope without `keyId`/`signature`. Every known key is tried.

Both are refused outside a timestamp window (5 minutes either way). The JWKS is fetched over
HTTPS (plain HTTP only for a loopback host outside production), cached for `ttl` seconds,
refetched once when a kid is unknown or a signature fails with the cached keys, and never more
often than `min_refetch` seconds; pinned keys are always trusted. Deduplication is the caller's
(`quotra.store.claims_repo`): the event key is (`data.id`, `type`) for 1Shot, (`webhook-id`,
`type`) for Standard Webhooks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from quotra import bounds

log = logging.getLogger("quotra.webhooks")

DEFAULT_TOLERANCE: Final = 300
MAX_BODY: Final = 256 * 1024
MAX_SIGNATURES: Final = 8
# 1Shot's webhook `type` values.
TYPE_CONFIRMED: Final = 0
TYPE_FAILED: Final = 1
TYPE_SUBMITTED: Final = 4
WEBHOOK_TYPES: Final = frozenset({TYPE_CONFIRMED, TYPE_FAILED, TYPE_SUBMITTED})


def canonical_json(value: Any) -> bytes:
    """Compact, sorted-key JSON, UTF-8, non-ASCII kept as is (what JavaScript's stable stringify emits)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64_any(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not (signatures arrive in either)."""
    cleaned = text.strip().replace("-", "+").replace("_", "/")
    return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)


# ---- keys --------------------------------------------------------------------------------------


def jwk_thumbprint(x: str) -> str:
    """RFC 7638 thumbprint of an Ed25519 JWK: the kid derived from the public key."""
    members = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, sort_keys=True, separators=(",", ":"))
    return b64url_encode(hashlib.sha256(members.encode()).digest())


@dataclass(frozen=True)
class Ed25519Signer:
    """A webhook signing key: its JWK, its kid (the JWK thumbprint) and detached signatures."""

    key: SigningKey

    @classmethod
    def generate(cls) -> Ed25519Signer:
        return cls(SigningKey.generate())

    @classmethod
    def from_text(cls, text: str) -> Ed25519Signer:
        """A 32-byte seed as 64 hex characters or base64 / base64url."""
        value = text.strip()
        try:
            seed = bytes.fromhex(value.removeprefix("0x")) if len(value.removeprefix("0x")) == 64 else b""
        except ValueError:
            seed = b""
        if not seed:
            try:
                seed = _b64_any(value)
            except (binascii.Error, ValueError) as exc:
                raise ValueError("an Ed25519 key is a 32-byte seed in hex or base64") from exc
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 key is a 32-byte seed, got {len(seed)} bytes")
        return cls(SigningKey(seed))

    @property
    def x(self) -> str:
        return b64url_encode(bytes(self.key.verify_key))

    @property
    def kid(self) -> str:
        return jwk_thumbprint(self.x)

    def jwk(self) -> dict[str, str]:
        return {"kty": "OKP", "crv": "Ed25519", "kid": self.kid, "x": self.x, "alg": "EdDSA", "use": "sig"}

    def sign(self, message: bytes) -> str:
        """Detached signature, standard base64."""
        return base64.b64encode(self.key.sign(message).signature).decode("ascii")

    def sign_oneshot(self, envelope: Mapping[str, Any]) -> dict[str, Any]:
        """The 1Shot body: `envelope` plus `keyId` and the signature over it."""
        body = {k: v for k, v in envelope.items() if k != "signature"}
        body["keyId"] = self.kid
        return {**body, "signature": self.sign(canonical_json(body))}

    def sign_standard(self, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """Standard Webhooks headers for `body`."""
        signature = self.sign(f"{msg_id}.{timestamp}.".encode() + body)
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": f"v1a,{signature}",
        }


def parse_jwks(document: Any) -> list[tuple[str, VerifyKey]]:
    """(kid, key) for every usable Ed25519 entry of a JWKS; other entries are skipped."""
    keys = document.get("keys") if isinstance(document, dict) else document
    if not isinstance(keys, list):
        raise ValueError("a JWKS is an object with a `keys` list")
    found = []
    for entry in keys:
        if not isinstance(entry, dict) or entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue
        kid, x = entry.get("kid"), entry.get("x")
        if not isinstance(kid, str) or not isinstance(x, str):
            continue
        try:
            raw = b64url_decode(x)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == 32:
            found.append((kid, VerifyKey(raw)))
    return found


def check_jwks_url(url: str, *, allow_http_loopback: bool) -> str:
    """HTTPS only, except plain HTTP to a loopback host when allowed (a local relayer in dev)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and allow_http_loopback and _is_loopback(parts.hostname):
        return url
    raise ValueError(f"the relayer JWKS must be fetched over https (http only for loopback in dev): {url}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JwksUnavailable(Exception):
    """The JWKS could not be fetched and no key is known (the sender should retry later)."""


@dataclass
class JwksCache:
    """The relayer's keys by kid: pinned ones plus the fetched JWKS (TTL, rate-limited refetch)."""

    http: httpx.AsyncClient | None
    url: str | None
    ttl: float = 600.0
    min_refetch: float = 30.0
    pinned: list[tuple[str, VerifyKey]] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic
    fetches: int = 0
    _keys: list[tuple[str, VerifyKey]] = field(default_factory=list)
    _fetched_at: float | None = None
    _error: str | None = None
    _forced_at: float | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def _fresh(self) -> bool:
        return self._fetched_at is not None and self.clock() - self._fetched_at < self.ttl

    def _may_force(self) -> bool:
        """Forced refetches (unknown kid, failed signature) happen at most once per `min_refetch`."""
        return self._forced_at is None or self.clock() - self._forced_at >= self.min_refetch

    async def _fetch(self) -> None:
        if self.url is None or self.http is None:
            return
        self.fetches += 1
        try:
            reply = await self.http.get(self.url, timeout=5.0, headers={"accept": "application/json"})
            reply.raise_for_status()
            keys = parse_jwks(reply.json())
        except (httpx.HTTPError, ValueError) as exc:
            # Keep the old keys; try again once `min_refetch` has passed.
            self._fetched_at = self.clock() - self.ttl + self.min_refetch
            self._error = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.warning("webhooks.jwks_fetch_failed", extra={"url": self.url, "error": self._error})
            return
        self._keys, self._fetched_at, self._error = keys, self.clock(), None

    async def keys(self, kid: str | None = None, *, refresh: bool = False) -> list[VerifyKey]:
        """Keys for `kid` (all keys when None). `refresh` asks for a refetch (granted if allowed).

        Raises `JwksUnavailable` when no key is known because the JWKS cannot be fetched."""
        async with self._lock:
            if not self._fresh():
                await self._fetch()
            elif refresh and self._may_force():
                self._forced_at = self.clock()
                await self._fetch()
            if self._error and not self._keys and not self.pinned:
                raise JwksUnavailable(f"could not fetch the relayer's keys from {self.url}: {self._error}")
            return [key for k, key in (*self.pinned, *self._keys) if kid is None or k == kid]

    async def keys_or_refetch(self, kid: str | None) -> tuple[list[VerifyKey], bool]:
        """Keys for `kid`, refetching once if there are none; also says whether a refetch may follow."""
        found = await self.keys(kid)
        if not found:
            found = await self.keys(kid, refresh=True)
        return found, self._may_force()


# ---- verification ------------------------------------------------------------------------------


class WebhookRejected(Exception):
    """A webhook that is not believed. `status` is 400 (malformed) or 401 (not authentic)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RelayerEvent:
    """A verified relayer webhook: what happened to one relayer task."""

    event_id: str
    type: int
    data: dict[str, Any]
    timestamp: int
    format: str  # "oneshot" | "standard"

    @property
    def task_id(self) -> str:
        return str(self.data.get("id", ""))

    @property
    def memo(self) -> str | None:
        memo = self.data.get("memo")
        return memo if isinstance(memo, str) else None

    @property
    def status(self) -> int | None:
        status = self.data.get("status")
        return status if isinstance(status, int) and not isinstance(status, bool) else None


def _verify_any(keys: Iterable[VerifyKey], message: bytes, signatures: Iterable[bytes]) -> bool:
    for key in keys:
        for signature in signatures:
            try:
                key.verify(message, signature)
                return True
            except (BadSignatureError, ValueError):
                continue
    return False


def _malformed(message: str) -> WebhookRejected:
    return WebhookRejected(400, "malformed_webhook", message)


def _parse_body(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY:
        raise _malformed(f"webhook body larger than {MAX_BODY} bytes")
    try:
        parsed = bounds.loads(body)
    except ValueError as exc:
        raise _malformed(f"webhook body is not valid JSON within bounds: {exc}") from exc
    if not isinstance(parsed, dict):
        raise _malformed("webhook body must be a JSON object")
    return parsed


def _int_field(body: Mapping[str, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _malformed(f"webhook field `{name}` must be an integer")
    return value


def _check_envelope(body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    event_type = _int_field(body, "type")
    if event_type not in WEBHOOK_TYPES:
        raise _malformed(f"unknown webhook type {event_type}")
    data = body.get("data")
    if not isinstance(data, dict):
        raise _malformed("webhook field `data` must be an object")
    if not data.get("id") or not bounds.printable(data["id"], 100):
        raise _malformed("webhook field `data.id` must be a task id of 1 to 100 printable characters")
    if data.get("memo") is not None and not bounds.printable(data["memo"], 256):
        raise _malformed("webhook field `data.memo` must be at most 256 printable characters")
    return event_type, data


class WebhookVerifier:
    """Checks a relayer webhook (either format) before anything is believed."""

    def __init__(
        self,
        jwks: JwksCache,
        *,
        tolerance: int = DEFAULT_TOLERANCE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.jwks = jwks
        self.tolerance = tolerance
        self.clock = clock

    def _check_time(self, timestamp: int) -> None:
        skew = timestamp - self.clock()
        if abs(skew) > self.tolerance:
            word = "in the future" if skew > 0 else "too old"
            raise WebhookRejected(
                401, "stale_timestamp", f"webhook timestamp is {word} (tolerance {self.tolerance} s)"
            )

    async def verify(self, headers: Mapping[str, str], body: bytes) -> RelayerEvent:
        """Raises `WebhookRejected` or `JwksUnavailable`; never changes anything."""
        if headers.get("webhook-signature") is not None:
            return await self.verify_standard(headers, body)
        return await self.verify_oneshot(body)

    async def verify_oneshot(self, body: bytes) -> RelayerEvent:
        parsed = _parse_body(body)
        signature_text, kid = parsed.get("signature"), parsed.get("keyId")
        if not isinstance(signature_text, str) or not signature_text:
            raise WebhookRejected(401, "missing_signature", "webhook has no `signature`")
        if not isinstance(kid, str) or not kid:
            raise _malformed("webhook field `keyId` must be a non-empty string")
        if _int_field(parsed, "apiVersion") != 0:
            raise _malformed(f"unsupported webhook apiVersion {parsed['apiVersion']}")
        event_type, data = _check_envelope(parsed)
        timestamp = _int_field(parsed, "timestamp")
        try:
            signature = _b64_any(signature_text)
        except (binascii.Error, ValueError) as exc:
            raise WebhookRejected(401, "invalid_signature", "webhook signature is not base64") from exc
        message = canonical_json({k: v for k, v in parsed.items() if k != "signature"})
        keys, may_refetch = await self.jwks.keys_or_refetch(kid)
        if not keys:
            raise WebhookRejected(401, "unknown_key", f"no relayer key with kid {kid!r}")
        # A rotated key reusing a kid: one more look at the JWKS, if allowed.
        if not _verify_any(keys, message, [signature]) and (
            not may_refetch or not _verify_any(await self.jwks.keys(kid, refresh=True), message, [signature])
        ):
            raise WebhookRejected(401, "invalid_signature", "webhook signature does not verify")
        self._check_time(timestamp)
        return RelayerEvent(f"{data['id']}", event_type, data, timestamp, "oneshot")

    async def verify_standard(self, headers: Mapping[str, str], body: bytes) -> RelayerEvent:
        msg_id = headers.get("webhook-id") or ""
        ts_text = headers.get("webhook-timestamp") or ""
        if not msg_id or len(msg_id) > 256:
            raise _malformed("missing or oversized `webhook-id` header")
        try:
            timestamp = int(ts_text)
        except ValueError as exc:
            raise _malformed("`webhook-timestamp` must be unix seconds") from exc
        signatures = []
        for item in (headers.get("webhook-signature") or "").split()[:MAX_SIGNATURES]:
            version, _, value = item.partition(",")
            if version != "v1a":
                continue  # v1 (HMAC) and unknown versions are not ours
            try:
                signatures.append(_b64_any(value))
            except (binascii.Error, ValueError):
                continue
        if not signatures:
            raise WebhookRejected(401, "missing_signature", "no `v1a` signature in `webhook-signature`")
        if len(body) > MAX_BODY:
            raise _malformed(f"webhook body larger than {MAX_BODY} bytes")
        message = f"{msg_id}.{ts_text}.".encode() + body
        keys = await self.jwks.keys()
        if not _verify_any(keys, message, signatures) and not _verify_any(
            await self.jwks.keys(refresh=True), message, signatures
        ):
            raise WebhookRejected(401, "invalid_signature", "webhook signature does not verify")
        self._check_time(timestamp)
        parsed = _parse_body(body)
        event_type, data = _check_envelope(parsed)
        return RelayerEvent(msg_id, event_type, data, timestamp, "standard")
