"""The local relayer's HTTP face: JSON-RPC 2.0 at `POST /` (and `/relayers`, 1Shot's path), its
webhook keys at `GET /.well-known/jwks.json`, and `GET /healthz`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from web3 import AsyncHTTPProvider, AsyncWeb3

from quotra_dev.relayer.service import RelayerConfig, RelayerCore, RpcError

log = logging.getLogger("quotra.relayer.app")


def _rpc_error(request_id: Any, error: RpcError) -> JSONResponse:
    return JSONResponse({"jsonrpc": "2.0", "id": request_id, "error": error.body()})


def create_relayer_app(
    config: RelayerConfig, *, http_transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """The relayer app; `app.state.core` is its `RelayerCore` once started (tests inspect it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        w3 = AsyncWeb3(AsyncHTTPProvider(config.rpc_url, request_kwargs={"timeout": 30}))
        http = httpx.AsyncClient(transport=http_transport, follow_redirects=False)
        core = RelayerCore(config, w3, http)
        app.state.core = core
        log.info(
            "relayer started",
            extra={"address": core.address, "chain_id": config.chain_id, "kid": config.signer.kid},
        )
        try:
            yield
        finally:
            await core.close()
            await http.aclose()
            await w3.provider.disconnect()

    app = FastAPI(title="Quotra local relayer", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def rpc(request: Request) -> JSONResponse:
        core: RelayerCore = request.app.state.core
        try:
            payload = json.loads(await request.body())
        except ValueError:
            return _rpc_error(None, RpcError(-32700, "Parse error"))
        if not isinstance(payload, dict) or not isinstance(payload.get("method"), str):
            return _rpc_error(
                payload.get("id") if isinstance(payload, dict) else None, RpcError(-32600, "Invalid Request")
            )
        request_id = payload.get("id")
        try:
            result = await core.dispatch(payload["method"], payload.get("params"))
        except RpcError as exc:
            return _rpc_error(request_id, exc)
        except Exception:
            log.exception("relayer.rpc_failed", extra={"method": payload["method"]})
            return _rpc_error(request_id, RpcError(-32603, "Internal error"))
        return JSONResponse({"jsonrpc": "2.0", "id": request_id, "result": result})

    app.add_api_route("/", rpc, methods=["POST"], include_in_schema=False)
    app.add_api_route("/relayers", rpc, methods=["POST"], include_in_schema=False)

    @app.get("/.well-known/jwks.json")
    async def jwks() -> JSONResponse:
        return JSONResponse({"keys": [config.signer.jwk()]}, headers={"cache-control": "public, max-age=600"})

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        core: RelayerCore = request.app.state.core
        return {
            "status": "ok",
            "address": core.address,
            "chain_id": config.chain_id,
            "kid": config.signer.kid,
        }

    return app
