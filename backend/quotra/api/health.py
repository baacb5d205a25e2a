"""Liveness, readiness and Prometheus metrics.

`/healthz`: the process lives. `/readyz`: it can serve calls, which needs its database and
nothing else; a replica is not pulled out of rotation for its chain or relayer, which only some
calls need (prepaid calls go on without the chain; x402 calls answer 503 until it is back), so
those are reported as components, `degraded` when down, in the body and as
`quotra_component_up` in `/metrics`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.responses import Response

from quotra.api.deps import Runtime, RuntimeDep
from quotra.api.routing import BoundedRoute

router = APIRouter(tags=["operations"], route_class=BoundedRoute)


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str  # ready | degraded (serving; a component is down) | unavailable (not serving)
    checks: dict[str, dict[str, Any]]


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _check_database(runtime: Runtime) -> dict[str, Any]:
    try:
        await asyncio.wait_for(runtime.store.ping(), timeout=5)
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__}
    return {"ok": True, "dialect": runtime.store.dialect}


async def _check_chain(runtime: Runtime) -> dict[str, Any]:
    settings = runtime.settings
    if not settings.chain_rpc_url:
        return {"ok": True, "skipped": True}
    try:
        reply = await runtime.http.post(
            settings.chain_rpc_url,
            json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
            timeout=settings.chain_read_timeout_seconds,
        )
        chain_id = int(reply.json()["result"], 16)
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__}
    if chain_id != settings.chain_id:
        return {"ok": False, "error": f"chain id {chain_id}, expected {settings.chain_id}"}
    return {"ok": True, "chain_id": chain_id}


async def _check_deployment(runtime: Runtime) -> dict[str, Any]:
    path = runtime.settings.deployment_file
    if path is None:
        return {"ok": True, "skipped": True}
    try:
        deployment = json.loads(await asyncio.to_thread(path.read_text))
    except (OSError, ValueError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__} reading {path}"}
    return {
        "ok": True,
        "file": str(path),
        "keys": sorted(deployment)[:20] if isinstance(deployment, dict) else [],
    }


def _check_payments(runtime: Runtime) -> dict[str, dict[str, Any]]:
    """x402 (taking payments) and settlement (the worker running), when this relay has a chain."""
    payments = runtime.payments
    if payments is None or not payments.configured:
        return {"x402": {"ok": True, "skipped": True}, "settlement": {"ok": True, "skipped": True}}
    x402: dict[str, Any] = {"ok": payments.gate.ready}
    if not payments.gate.ready:
        x402["error"] = "waiting for the chain: x402 calls answer 503"
    settlement: dict[str, Any] = {"ok": payments.worker is not None}
    if not runtime.settings.settlement_enabled:
        settlement = {"ok": True, "skipped": True}
    elif payments.worker is None:
        settlement["error"] = (
            "no operator key (QUOTRA_OPERATOR_KEY)" if payments.operator is None else "waiting for the chain"
        )
    return {"x402": x402, "settlement": settlement}


async def components(runtime: Runtime) -> dict[str, dict[str, Any]]:
    database, chain, deployment = await asyncio.gather(
        _check_database(runtime), _check_chain(runtime), _check_deployment(runtime)
    )
    checks = {"database": database, "chain": chain, "deployment": deployment, **_check_payments(runtime)}
    for name, check in checks.items():
        runtime.metrics.component_up.labels(name).set(1 if check["ok"] else 0)
    return checks


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="The relay can serve calls (its database answers); other components are reported",
)
async def readyz(runtime: RuntimeDep) -> Response:
    checks = await components(runtime)
    if not checks["database"]["ok"]:
        status, code = "unavailable", 503
    elif all(check["ok"] for check in checks.values()):
        status, code = "ready", 200
    else:
        status, code = "degraded", 200
    return JSONResponse({"status": status, "checks": checks}, status_code=code)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(runtime: RuntimeDep) -> Response:
    await components(runtime)
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
