"""Shared state built once in the app's lifespan, and the request dependencies built on it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import httpx
from fastapi import Depends, Request

from quotra.calls.store import CallStore
from quotra.chain.client import EscrowClient
from quotra.chain.relayer import Relayer
from quotra.config import Settings
from quotra.errors import AuthenticationFailed, Forbidden, NotFound
from quotra.metrics import Metrics
from quotra.netguard import NetGuard
from quotra.payments.allowances import AllowanceService
from quotra.payments.apps import AppService
from quotra.payments.claims import ClaimService
from quotra.payments.exits import Exits
from quotra.payments.prepaid import KEY_PREFIX, PrepaidService
from quotra.ratelimit import TokenBucketLimiter
from quotra.services.gate import Caller, PaymentGate
from quotra.services.listings import ListingCache, ListingService
from quotra.services.relay import Relay
from quotra.siwe import SiweVerifier
from quotra.store.claims_repo import ClaimsRepo
from quotra.store.repositories import Store
from quotra.vault import Vault
from quotra.webhooks import WebhookVerifier

if TYPE_CHECKING:
    from quotra.payments.service import Payments

SESSION_PREFIX = "qs_"
# The marketplace pages' session: the same token in an HttpOnly, SameSite=Strict cookie, set by
# `POST /v1/auth/verify` when the page asks for it (with WEB_HEADER). A state-changing request
# authenticated by the cookie must also carry WEB_HEADER or come from this relay's own Origin:
# another site can send neither (SameSite=Strict keeps the cookie from it in the first place).
SESSION_COOKIE = "quotra_session"
WEB_HEADER = "quotra-web"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class SessionTokens:
    """Stateless, HMAC-signed session tokens: `qs_<payload>.<mac>` (payload: address, expiry)."""

    def __init__(self, master_key: bytes, ttl_seconds: int) -> None:
        self._key = hmac.new(master_key, b"quotra-session-token-v1", hashlib.sha256).digest()
        self.ttl = ttl_seconds

    def _mac(self, payload: bytes) -> str:
        return (
            base64.urlsafe_b64encode(hmac.new(self._key, payload, hashlib.sha256).digest())
            .rstrip(b"=")
            .decode()
        )

    def issue(self, address: str, now: float | None = None) -> tuple[str, int]:
        expires = int((now or time.time()) + self.ttl)
        payload = json.dumps({"a": address, "e": expires}, separators=(",", ":")).encode()
        encoded = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
        return f"{SESSION_PREFIX}{encoded}.{self._mac(payload)}", expires

    def verify(self, token: str, now: float | None = None) -> str | None:
        if not token.startswith(SESSION_PREFIX):
            return None
        encoded, _, mac = token[len(SESSION_PREFIX) :].partition(".")
        try:
            payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            if not hmac.compare_digest(mac, self._mac(payload)):
                return None
            data = json.loads(payload)
            if int(data["e"]) <= (now or time.time()):
                return None
            return str(data["a"])
        except (ValueError, KeyError, TypeError):
            return None


@dataclass
class Runtime:
    settings: Settings
    store: Store
    vault: Vault
    http: httpx.AsyncClient
    metrics: Metrics
    limiter: TokenBucketLimiter
    netguard: NetGuard
    cache: ListingCache
    listings: ListingService
    gate: PaymentGate
    relay: Relay
    sessions: SessionTokens
    siwe: SiweVerifier
    escrow: EscrowClient | None  # None when no chain is configured
    relayer: Relayer | None
    calls: CallStore
    prepaid: PrepaidService
    apps: AppService
    claims_repo: ClaimsRepo
    claims: ClaimService | None = None  # None without a chain and a relayer
    webhook_verifier: WebhookVerifier | None = None  # None without relayer keys (JWKS or pinned)
    payments: Payments | None = None  # x402, settlement, indexer (quotra.payments.service)
    exits: Exits | None = None  # ETH-free withdrawals; None without a chain and a relayer
    # Periodic allowances and auto top-ups; None without the framework and the operator's key.
    allowances: AllowanceService | None = None


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_relayer(runtime: RuntimeDep) -> Relayer:
    """The configured relayer (`QUOTRA_RELAYER=direct|oneshot`) for gasless transactions."""
    if runtime.relayer is None:
        raise NotFound(
            "No relayer is configured (QUOTRA_RELAYER=direct needs QUOTRA_OPERATOR_KEY, "
            "oneshot needs QUOTRA_RELAYER_URL; both need the chain)",
            code="relayer_unavailable",
        )
    return runtime.relayer


RelayerDep = Annotated[Relayer, Depends(get_relayer)]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("The Authorization header must be 'Bearer <token>'")
    return token.strip()


def from_own_page(request: Request, settings: Settings) -> bool:
    """Whether a request comes from this relay's pages: WEB_HEADER (which no other origin can
    send without a CORS preflight this relay never grants) or an Origin equal to its own."""
    if WEB_HEADER in request.headers:
        return True
    origin = request.headers.get("origin")
    return origin is not None and origin.rstrip("/") == settings.public_origin


def _credential(request: Request, settings: Settings) -> str | None:
    """The bearer token, else the session cookie (CSRF-checked on state-changing requests)."""
    token = bearer_token(request)
    if token is not None:
        return token
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    if request.method not in SAFE_METHODS and not from_own_page(request, settings):
        raise Forbidden(
            f"A request signed in by cookie must come from this site's pages (send the "
            f"'{WEB_HEADER}' header)",
            code="csrf_failed",
        )
    return cookie


def client_ip(request: Request, settings: Settings) -> str:
    """The client's address: the peer's, or behind `trusted_proxy_hops` proxies the one the
    outermost of them saw (counted from the right of X-Forwarded-For; never the client-written
    left end). With fewer entries than proxies, or an entry that is no IP address, the header is
    not trusted."""
    peer = request.client.host if request.client else "unknown"
    if settings.trust_forwarded_for:
        entries = [e.strip() for e in ",".join(request.headers.getlist("x-forwarded-for")).split(",")]
        entries = [e for e in entries if e]
        if len(entries) >= settings.trusted_proxy_hops:
            try:
                return str(ipaddress.ip_address(entries[-settings.trusted_proxy_hops]))
            except ValueError:
                pass
    return peer


async def current_provider(request: Request, runtime: RuntimeDep) -> str:
    token = _credential(request, runtime.settings)
    if token is None:
        raise AuthenticationFailed("Sign in with Ethereum first (POST /v1/auth/nonce, then /v1/auth/verify)")
    address = runtime.sessions.verify(token)
    if address is None:
        raise AuthenticationFailed("The session token is invalid or expired", code="invalid_session")
    return address


async def current_caller(request: Request, runtime: RuntimeDep) -> Caller:
    """A consumer: signed-in wallet, prepaid or sandbox API key, or (no credentials) the client address."""
    token = _credential(request, runtime.settings)
    if token is None:
        return Caller("anonymous", f"ip:{client_ip(request, runtime.settings)}")
    if token.startswith(SESSION_PREFIX):
        address = runtime.sessions.verify(token)
        if address is None:
            raise AuthenticationFailed("The session token is invalid or expired", code="invalid_session")
        return Caller("wallet", f"wallet:{address.lower()}")
    if token in runtime.settings.sandbox_key_set:
        return Caller("sandbox_key", "key:" + hashlib.sha256(token.encode()).hexdigest()[:16])
    if token.startswith(KEY_PREFIX):
        key = await runtime.prepaid.authenticate(token)
        return Caller("api_key", f"wallet:{key.wallet.lower()}", api_key=key)
    if "payment-signature" in request.headers or "x-payment" in request.headers:
        # An x402 payment pays for the call: SDKs that always send some bearer key (the OpenAI
        # SDK wrapped in an x402 transport) must not be refused for it.
        return Caller("anonymous", f"ip:{client_ip(request, runtime.settings)}")
    raise AuthenticationFailed(
        "Unknown API key. Call without a key (playground), with a sign-in session token, "
        "or with a Quotra API key (sk-quotra-…)"
    )


async def bearer_wallet(request: Request, runtime: Runtime) -> str | None:
    """The wallet behind the request's bearer token, a sign-in session or an API key; None
    without one (401 for an invalid one)."""
    token = _credential(request, runtime.settings)
    if token is None:
        return None
    if token.startswith(SESSION_PREFIX):
        address = runtime.sessions.verify(token)
        if address is None:
            raise AuthenticationFailed("The session token is invalid or expired", code="invalid_session")
        return address
    if token.startswith(KEY_PREFIX):
        return (await runtime.prepaid.authenticate(token)).wallet
    return None


CurrentProvider = Annotated[str, Depends(current_provider)]
CurrentCaller = Annotated[Caller, Depends(current_caller)]
