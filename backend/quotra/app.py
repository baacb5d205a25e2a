"""The FastAPI application: lifespan wiring, pure-ASGI middleware (metrics, body limit,
last-resort guard) and the single place where errors become OpenAI error objects."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from web3.exceptions import ProviderConnectionError

from quotra import __version__, web
from quotra.api import account, apps, auth, chat, claims, health, listings, market, models, webhooks
from quotra.api import calls as calls_api
from quotra.api.deps import Runtime, SessionTokens
from quotra.api.routing import openapi_document
from quotra.calls.outbox import Outbox
from quotra.calls.store import CallStore
from quotra.chain.client import EscrowClient
from quotra.chain.relayer import DirectRelayer, Relayer, RelayerError
from quotra.config import Settings
from quotra.errors import HeadersTooLarge, PayloadTooLarge, QuotraError, error_body
from quotra.metrics import Metrics
from quotra.netguard import NetGuard
from quotra.payments.allowances import AllowanceService
from quotra.payments.apps import AppService
from quotra.payments.claims import build_claims, configured_relayer, webhook_verifier
from quotra.payments.exits import Exits
from quotra.payments.prepaid import PrepaidService, PrepaidSettings
from quotra.payments.service import Payments, escrow_location, load_operator
from quotra.ratelimit import TokenBucketLimiter
from quotra.services.gate import PaymentGate
from quotra.services.listings import ListingCache, ListingService
from quotra.services.relay import Relay
from quotra.services.upstreams import AdapterFactory, AdapterRegistry
from quotra.siwe import Erc1271Fn, SiweVerifier, web3_erc1271
from quotra.store.allowances_repo import AllowancesRepo
from quotra.store.apps_repo import AppsStore
from quotra.store.db import create_engine, upgrade
from quotra.store.prepaid_repo import PrepaidStore
from quotra.store.repositories import Store
from quotra.store.transactions import Transactions
from quotra.upstream import create_session
from quotra.vault import Vault

log = logging.getLogger("quotra.app")

_STATUS_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` while the body is read, so FastAPI passes it through untouched."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes")


def _json_response_parts(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> list[Message]:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return [
        {"type": "http.response.start", "status": status, "headers": raw},
        {"type": "http.response.body", "body": payload},
    ]


class RelayMiddleware:
    """Counts requests and latency per route, limits the request's headers (431) and its body
    while it is read (413), and turns anything unhandled into a bare OpenAI-shaped 500 (never a
    traceback)."""

    def __init__(self, app: ASGIApp, *, max_body: int, max_headers: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body = max_body
        self.max_headers = max_headers
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False

        def route_name() -> str:
            route = scope.get("route")
            return getattr(route, "path", None) or "unmatched"

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                self.metrics.latency.labels(route_name()).observe(time.perf_counter() - started)
            await send(message)

        refusal: QuotraError | None = None
        length = _content_length(scope)
        if sum(len(name) + len(value) for name, value in scope["headers"]) > self.max_headers:
            refusal = HeadersTooLarge(f"The request headers are larger than {self.max_headers} bytes")
        elif length is not None and length > self.max_body:
            refusal = PayloadTooLarge(f"The request body is larger than {self.max_body} bytes")
        if refusal is not None:
            parts = _json_response_parts(refusal.status_code, refusal.body(), {"connection": "close"})
            for message in parts:
                await send_wrapper(message)
            self.metrics.requests.labels(scope["method"], route_name(), str(refusal.status_code)).inc()
            return

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        try:
            await self.app(scope, receive_limited, send_wrapper)
        except Exception:
            log.exception("unhandled error", extra={"path": scope.get("path", "")})
            if not response_started:
                body = error_body(
                    500,
                    "The server had an error processing the request",
                    type_="server_error",
                    code="internal_error",
                )
                for message in _json_response_parts(500, body):
                    await send_wrapper(message)
        finally:
            self.metrics.requests.labels(scope["method"], route_name(), str(status)).inc()


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


# Seconds a client is asked to wait when the chain node or the relayer is unreachable.
OUTAGE_RETRY_AFTER = 2
# What an unreachable chain node or relayer raises: aiohttp (web3's provider, the bare JSON-RPC
# reads) and httpx (relayer APIs) connection errors and timeouts, web3's own connection error.
_OUTAGES: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,
    httpx.TransportError,
    ProviderConnectionError,
    RelayerError,
    TimeoutError,
    ConnectionError,
)


def is_outage(exc: BaseException) -> bool:
    """Whether `exc`, or what caused it, is a dependency out of reach rather than a bug."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, _OUTAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(QuotraError)
    async def _quotra(_: Request, exc: QuotraError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            context = first.get("ctx")
            reason = context.get("error", "") if isinstance(context, dict) else ""
            message = f"The request body is not valid JSON: {reason}".rstrip(": ")
            return JSONResponse(
                error_body(400, message, type_="invalid_request_error", code="invalid_json"), status_code=400
            )
        param = _validation_param(tuple(first.get("loc", ())))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(
            error_body(400, message, type_="invalid_request_error", code="invalid_request", param=param),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_, code = _STATUS_TYPES.get(
            exc.status_code, ("server_error" if exc.status_code >= 500 else "invalid_request_error", None)
        )
        message = exc.detail if isinstance(exc.detail, str) else "Request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "Unknown path"
        return JSONResponse(
            error_body(exc.status_code, message, type_=type_, code=code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        if is_outage(exc):
            # A dependency out of reach (the chain node, the relayer) while answering a route
            # that needs it: nothing was done, the client should retry.
            log.warning("dependency unavailable", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
            return JSONResponse(
                error_body(
                    503,
                    "A service this request needs (the chain node or the relayer) is unreachable; "
                    "nothing was done. Retry shortly.",
                    type_="server_error",
                    code="dependency_unavailable",
                ),
                status_code=503,
                headers={"Retry-After": str(OUTAGE_RETRY_AFTER)},
            )
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body(
                500,
                "The server had an error processing the request",
                type_="server_error",
                code="internal_error",
            ),
            status_code=500,
        )


def connect_chain(
    settings: Settings, relayer: Relayer | None = None
) -> tuple[EscrowClient | None, Relayer | None, str | None]:
    """The escrow client (`chain_rpc_url` and the escrow from the settings or `deployment_file`),
    the relayer (the given one, else a DirectRelayer with the operator's key) and the operator's
    address; Nones when not configured."""
    location = escrow_location(settings) if settings.chain_rpc_url else None
    if location is None or settings.chain_rpc_url is None:
        return None, relayer, None
    escrow = EscrowClient.connect(
        settings.chain_rpc_url,
        escrow=location.escrow,
        usdc=location.usdc,
        chain_id=settings.chain_id,
        timeout=settings.chain_read_timeout_seconds,
    )
    signer = load_operator(settings)
    if signer is not None and relayer is None:
        relayer = DirectRelayer(escrow.w3, signer, chain_id=settings.chain_id)
    return escrow, relayer, None if signer is None else signer.address


async def sweep_calls(calls: CallStore, every: float) -> None:
    """Ends reservations whose call never finished (its relay stopped): voided, nothing charged.
    Every replica sweeps; each call is voided once whoever gets there first."""
    while True:
        try:
            swept = await calls.sweep()
            if swept:
                log.warning("swept reservations that never finished", extra={"count": swept})
        except Exception:
            log.warning("sweep failed; retrying", exc_info=True)
        await asyncio.sleep(every)


def create_app(
    settings: Settings | None = None,
    *,
    adapter_factory: AdapterFactory | None = None,
    erc1271: Erc1271Fn | None = None,
    http_transport: httpx.AsyncBaseTransport | None = None,
    relayer: Relayer | None = None,
) -> FastAPI:
    """The relay. Tests inject fakes for the upstream adapters, ERC-1271, the relay's other
    outgoing HTTP (`http_transport`) and the relayer."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys, primary = settings.load_keyring()
        vault = Vault(keys, primary)
        engine = create_engine(settings.effective_database_url)
        if settings.run_migrations_on_start:
            await upgrade(engine)
        store = Store(engine)
        transactions = Transactions(engine)
        calls = CallStore(engine, transactions)
        outbox = Outbox(engine, transactions)
        # Everything but the upstream calls: the chain RPC health check, the relayer, its JWKS.
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.upstream_timeout_seconds, connect=10.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
            transport=http_transport,
            follow_redirects=False,
        )
        netguard = NetGuard.from_lists(
            allow_private=settings.upstream_allow_private,
            allowlist=settings.upstream_allowlist,
            denylist=settings.upstream_denylist,
        )
        upstreams = create_session(timeout=settings.upstream_timeout_seconds, guard=netguard)
        adapters = AdapterRegistry(upstreams, factory=adapter_factory)
        cache = ListingCache(store, settings.listing_cache_ttl_seconds)
        limiter = TokenBucketLimiter()
        listing_service = ListingService(
            store, vault, cache, adapters, netguard, check_keys=settings.upstream_check_keys
        )
        checker = erc1271
        if checker is None and settings.chain_rpc_url:
            checker = web3_erc1271(settings.chain_rpc_url)
        chosen_relayer = relayer or configured_relayer(settings, http)
        escrow, chain_relayer, operator = connect_chain(settings, chosen_relayer)
        claims_repo, claim_service = build_claims(settings, store, escrow, chain_relayer)
        prepaid = PrepaidService(
            PrepaidStore(store, transactions),
            calls,
            settings=PrepaidSettings(
                key_cache_seconds=settings.prepaid_key_cache_seconds,
                max_keys_per_wallet=settings.prepaid_max_keys_per_wallet,
                refresh_seconds=settings.prepaid_refresh_seconds,
                permission_margin_seconds=settings.prepaid_permission_margin_seconds,
                deposit_wait_seconds=settings.prepaid_deposit_wait_seconds,
                key_rate_per_minute=settings.key_rate_per_minute,
            ),
            chain=escrow,
            relayer=chain_relayer,
            operator=operator,
            erc1271=checker,
        )
        payments = Payments(
            settings, store, metrics, calls=calls, outbox=outbox, client=escrow, relayer=chain_relayer
        )
        gate = PaymentGate(
            calls,
            free_calls=settings.playground_free_calls,
            daily_free_calls=settings.playground_free_calls_per_day,
            call_timeout=settings.call_timeout_seconds,
            prepaid=prepaid,
            x402=payments.gate,
        )
        app.state.runtime = Runtime(
            settings=settings,
            store=store,
            vault=vault,
            http=http,
            metrics=metrics,
            limiter=limiter,
            netguard=netguard,
            cache=cache,
            listings=listing_service,
            gate=gate,
            relay=Relay(
                store=store,
                calls=calls,
                cache=cache,
                listings=listing_service,
                adapters=adapters,
                gate=gate,
                limiter=limiter,
                metrics=metrics,
                consumer_rate_per_minute=settings.consumer_rate_per_minute,
                cooldown_after_failures=settings.cooldown_after_failures,
                cooldown_seconds=settings.cooldown_seconds,
            ),
            sessions=SessionTokens(keys[primary], settings.session_ttl_seconds),
            siwe=SiweVerifier(
                domain=settings.expected_siwe_domain,
                uri=settings.public_url,
                chain_id=settings.chain_id,
                erc1271=checker,
            ),
            escrow=escrow,
            relayer=chain_relayer,
            calls=calls,
            prepaid=prepaid,
            apps=AppService(AppsStore(store), prepaid, escrow),
            claims_repo=claims_repo,
            claims=claim_service,
            webhook_verifier=webhook_verifier(settings, http),
            payments=payments,
            exits=None
            if claim_service is None
            else Exits(claim_service.escrow, claim_service.relayer, claim_service.quote),
        )
        await payments.start()  # x402 on (USDC's domain read once), settlement worker, indexer
        runtime: Runtime = app.state.runtime
        if claim_service is not None and claim_service.framework is not None and operator is not None:
            runtime.allowances = AllowanceService(
                AllowancesRepo(store),
                claim_service.escrow,
                claim_service.framework,
                operator,
                lambda: payments.relayer,
                low_water=int(settings.allowance_low_water_usdc * 10**6),
                poll_seconds=settings.allowance_poll_seconds,
                from_block=claim_service.from_block,
            )
        background = [asyncio.create_task(sweep_calls(calls, settings.sweep_seconds), name="call-sweeper")]
        if settings.prepaid_refresh_seconds > 0:
            background.append(asyncio.create_task(prepaid.run_background(), name="prepaid-refresher"))
        if claim_service is not None:
            background.append(asyncio.create_task(claim_service.run(asyncio.Event()), name="claims-poller"))
        if missing := web.missing_vendor_files():
            log.warning("the marketplace pages lack %s: run `make setup`", ", ".join(missing))
        if runtime.allowances is not None and settings.allowance_poll_seconds > 0:
            background.append(
                asyncio.create_task(runtime.allowances.run(asyncio.Event()), name="allowance-top-ups")
            )
        log.info(
            "relay started",
            extra={"env": settings.env, "database": store.dialect, "version": __version__},
        )
        # What start-up built (modules, ABIs, schemas, compiled statements) lives as long as the
        # process: out of the collector's sight, so that its full collections only walk what the
        # calls allocate (they had cost ~9 % of the event loop in a profile of the playground path).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await payments.stop()
            await prepaid.close()
            if escrow is not None:
                await escrow.close()
            await upstreams.close()
            await http.aclose()
            await transactions.close()
            await engine.dispose()

    app = FastAPI(
        title="Quotra relay",
        version=__version__,
        summary="OpenAI-compatible gateway over provider listings",
        lifespan=lifespan,
        telemetry={} if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    app.add_middleware(
        RelayMiddleware,
        max_body=settings.max_body_bytes,
        max_headers=settings.max_header_bytes,
        metrics=metrics,
    )
    for module in (chat, models, listings, auth, account, apps, calls_api, claims, webhooks, health, market):
        app.include_router(module.router)
    app.openapi = openapi_document(app)  # type: ignore[method-assign]
    app.include_router(web.router)  # the marketplace pages
    app.mount("/static", web.static_files(), name="static")
    app.state.metrics = metrics
    return app
