"""`GET /v1/models`: OpenAI's model list, built from the live listings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from quotra.api.deps import RuntimeDep
from quotra.api.routing import BoundedRoute
from quotra.services.gate import usdc

router = APIRouter(tags=["openai"], route_class=BoundedRoute)


class ModelObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelObject]


@router.get("/v1/models", response_model=ModelList, summary="Models served by live listings")
async def list_models(runtime: RuntimeDep) -> dict[str, Any]:
    models: dict[str, dict[str, Any]] = {}
    for listing in await runtime.cache.live():
        created = int(listing.created_at.timestamp())
        for name in listing.models:
            entry = models.setdefault(
                name,
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "quotra",
                    "listings": 0,
                    "min_price_per_call": listing.price_per_call,
                },
            )
            entry["listings"] += 1
            entry["created"] = min(entry["created"], created)
            entry["min_price_per_call"] = min(entry["min_price_per_call"], listing.price_per_call)
    data = sorted(models.values(), key=lambda m: m["id"])
    for entry in data:
        entry["min_price_per_call"] = usdc(entry["min_price_per_call"])
    return {"object": "list", "data": data}
