"""Public reads for the marketplace pages and any client: the network a wallet must be on, the
providers' records, and the caller's free playground calls."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from eth_utils import to_checksum_address
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from quotra.api.deps import CurrentCaller, RuntimeDep
from quotra.api.routing import BoundedRoute, errors
from quotra.services.market import MarketReads

router = APIRouter(tags=["market"], route_class=BoundedRoute)

CHAIN_NAMES = {84532: "Base Sepolia", 8453: "Base"}


class Usdc(BaseModel):
    address: str
    name: str = Field(description="USDC's EIP-712 domain name, as read from the chain")
    version: str
    decimals: int = 6


class Network(BaseModel):
    chain_id: int
    network: str = Field(description="CAIP-2, as x402 names it")
    chain_name: str
    wallet_rpc_url: str | None = Field(description="The RPC URL to offer a wallet that lacks the chain")
    escrow: str | None
    usdc: Usdc | None = Field(description="None until the relay has read USDC's domain from the chain")
    x402: bool
    prepaid: bool
    claims: bool
    playground_free_calls: int


class ProviderRecordOut(BaseModel):
    address: str
    listings: int
    calls_served: int
    upstream_failures: int
    success_rate: float | None = Field(
        description="Served ÷ (served + upstream failures); null with no calls"
    )
    median_latency_ms: int | None
    first_listed_at: datetime


class ProviderRecordList(BaseModel):
    object: str = "list"
    data: list[ProviderRecordOut]


class FreeCalls(BaseModel):
    free_calls_per_listing: int
    used: dict[str, int] = Field(description="Listing id → free calls the caller has used on it")


@router.get("/v1/network", response_model=Network, summary="The chain, escrow and USDC this relay uses")
async def network(runtime: RuntimeDep) -> dict[str, Any]:
    settings = runtime.settings
    terms = runtime.payments.gate.terms if runtime.payments is not None else None
    escrow = runtime.escrow
    return {
        "chain_id": settings.chain_id,
        "network": f"eip155:{settings.chain_id}",
        "chain_name": CHAIN_NAMES.get(settings.chain_id, f"Chain {settings.chain_id}"),
        "wallet_rpc_url": settings.effective_wallet_rpc_url,
        "escrow": None if escrow is None else escrow.escrow_address,
        "usdc": None
        if terms is None
        else {"address": terms.asset, "name": terms.asset_name, "version": terms.asset_version},
        "x402": runtime.payments is not None and runtime.payments.gate.ready,
        "prepaid": escrow is not None and runtime.relayer is not None,
        "claims": runtime.claims is not None,
        "playground_free_calls": settings.playground_free_calls,
    }


@router.get(
    "/v1/providers",
    response_model=ProviderRecordList,
    summary="Providers' records, from the relay's own call records",
    responses=errors(400),
)
async def providers(
    runtime: RuntimeDep,
    address: Annotated[
        list[Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{40}$")]],
        Query(min_length=1, max_length=100, description="Provider addresses (repeat the parameter)"),
    ],
) -> dict[str, Any]:
    reads = MarketReads(runtime.calls.engine)
    records = await reads.provider_records(to_checksum_address(a) for a in address)
    data = [
        {
            "address": r.address,
            "listings": r.listings,
            "calls_served": r.calls_served,
            "upstream_failures": r.upstream_failures,
            "success_rate": r.success_rate,
            "median_latency_ms": r.median_latency_ms,
            "first_listed_at": r.first_listed_at,
        }
        for r in records
    ]
    return {"object": "list", "data": data}


@router.get(
    "/v1/playground",
    response_model=FreeCalls,
    summary="The caller's free playground calls per listing (by session, key or address)",
    responses=errors(400, 401),
)
async def playground(runtime: RuntimeDep, caller: CurrentCaller) -> dict[str, Any]:
    used = await MarketReads(runtime.calls.engine).free_calls_used(caller.id)
    return {"free_calls_per_listing": runtime.settings.playground_free_calls, "used": used}
