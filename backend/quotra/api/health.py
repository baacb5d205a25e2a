"""Liveness, readiness (database and, when configured, the chain) and Prometheus metrics."""

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

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
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
    if not settings.chain_rpc_url or not settings.readyz_check_chain:
        return {"ok": True, "skipped": True}
    try:
        reply = await runtime.http.post(
            settings.chain_rpc_url,
            json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
            timeout=3.0,
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


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Dependencies are reachable",
)
async def readyz(runtime: RuntimeDep) -> Response:
    database, chain, deployment = await asyncio.gather(
        _check_database(runtime), _check_chain(runtime), _check_deployment(runtime)
    )
    checks = {"database": database, "chain": chain, "deployment": deployment}
    ready = all(check["ok"] for check in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
