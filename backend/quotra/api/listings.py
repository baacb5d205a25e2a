"""Listings: public search, and create/update/pause/revoke by the owning wallet.
No endpoint ever returns a listing's API key."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quotra.api.deps import CurrentProvider, RuntimeDep
from quotra.api.routing import BoundedRoute, errors
from quotra.bounds import ModelName, ModelRef, Offset, Omittable, PageSize, Secret, TokenCount, UrlText
from quotra.errors import BadRequest, NotFound
from quotra.services.gate import usdc
from quotra.services.listings import LISTING_ID_PATTERN
from quotra.store.models import utcnow
from quotra.store.repositories import ListingRecord

router = APIRouter(prefix="/v1/listings", tags=["listings"], route_class=BoundedRoute)

UpstreamKind = Literal["openai", "anthropic", "gemini", "openai-compatible", "sandbox"]
ATOMIC = Decimal(10**6)
MIN_PRICE, MAX_PRICE = Decimal("0.0001"), Decimal("1.00")
ListingId = Annotated[str, Path(pattern=LISTING_ID_PATTERN)]
Price = Annotated[Decimal, Field(ge=MIN_PRICE, le=MAX_PRICE, decimal_places=6, description="USDC per call")]
TokenPrice = Annotated[
    Decimal, Field(ge=0, le=Decimal(1000), decimal_places=6, description="USDC per 1M tokens")
]


def to_atomic(value: Decimal) -> int:
    return int(value * ATOMIC)


class ListingLimits(BaseModel):
    max_calls: int | None = Field(default=None, ge=1, le=10**12)
    max_input_chars: int | None = Field(default=None, ge=1, le=10**8)
    max_input_tokens: TokenCount | None = None
    max_output_tokens: TokenCount | None = None
    rate_per_minute: int | None = Field(default=None, ge=1, le=100_000)
    free_calls_per_day: int | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        description="Free playground calls a UTC day, across all consumers (0: none; null: the "
        "relay's default)",
    )
    expires_at: datetime | None = None

    @field_validator("expires_at")
    @classmethod
    def _aware_future(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        value = value if value.tzinfo else value.replace(tzinfo=UTC)
        if value <= datetime.now(UTC):
            raise ValueError("expires_at must be in the future")
        if value.year > 9000:
            raise ValueError("expires_at is too far in the future")
        return value


class ListingCreate(ListingLimits):
    model_config = ConfigDict(extra="forbid")

    kind: UpstreamKind
    api_key: Secret | None = Field(default=None, description="Write-only; never returned")
    base_url: UrlText | None = None
    models: list[ModelName] = Field(min_length=1, max_length=100)
    price_per_call: Price
    price_input_per_mtok: TokenPrice | None = None
    price_output_per_mtok: TokenPrice | None = None
    active: bool = True

    @model_validator(mode="after")
    def _kind_rules(self) -> ListingCreate:
        if self.kind == "openai-compatible" and not self.base_url:
            raise ValueError("openai-compatible listings need a base_url")
        if self.kind != "openai-compatible" and self.base_url:
            raise ValueError("base_url applies only to openai-compatible listings")
        if self.kind != "sandbox" and self.api_key is None:
            raise ValueError("api_key is required")
        return self


class ListingUpdate(ListingLimits):
    model_config = ConfigDict(extra="forbid")

    api_key: Omittable[Secret] = None
    base_url: Omittable[UrlText] = None
    models: Omittable[Annotated[list[ModelName], Field(min_length=1, max_length=100)]] = None
    price_per_call: Omittable[Price] = None
    price_input_per_mtok: TokenPrice | None = None
    price_output_per_mtok: TokenPrice | None = None
    active: bool | None = None


class ListingPublic(BaseModel):
    id: str
    object: str = "listing"
    model: str = Field(description="The value of `model` that calls exactly this listing")
    owner: str
    kind: str
    models: list[str]
    price_per_call: str
    price_per_call_atomic: int
    price_input_per_mtok: str | None
    price_output_per_mtok: str | None
    max_calls: int | None
    calls_used: int
    remaining_calls: int | None
    max_input_chars: int | None
    max_input_tokens: int | None
    max_output_tokens: int | None
    rate_per_minute: int | None
    free_calls_per_day: int = Field(description="Free playground calls a UTC day, across all consumers")
    free_calls_left_today: int
    expires_at: datetime | None
    status: str
    healthy: bool
    created_at: datetime


class ListingPrivate(ListingPublic):
    base_url: str | None
    cooldown_until: datetime | None
    updated_at: datetime


class ListingList(BaseModel):
    object: str = "list"
    data: list[ListingPublic]


class ListingPrivateList(BaseModel):
    object: str = "list"
    data: list[ListingPrivate]


def public_view(record: ListingRecord, daily_free_calls: int) -> dict[str, Any]:
    """The listing as anyone sees it; `daily_free_calls`: the relay's default daily free calls."""
    now = utcnow()
    return {
        "id": record.id,
        "object": "listing",
        "model": f"listing/{record.id}",
        "owner": record.owner,
        "kind": record.kind,
        "models": list(record.models),
        "price_per_call": usdc(record.price_per_call),
        "price_per_call_atomic": record.price_per_call,
        "price_input_per_mtok": None
        if record.price_input_per_mtok is None
        else usdc(record.price_input_per_mtok),
        "price_output_per_mtok": None
        if record.price_output_per_mtok is None
        else usdc(record.price_output_per_mtok),
        "max_calls": record.max_calls,
        "calls_used": record.calls_used,
        "remaining_calls": record.remaining_calls,
        "max_input_chars": record.max_input_chars,
        "max_input_tokens": record.max_input_tokens,
        "max_output_tokens": record.max_output_tokens,
        "rate_per_minute": record.rate_per_minute,
        "free_calls_per_day": record.free_calls_budget(daily_free_calls),
        "free_calls_left_today": record.free_calls_left(now, daily_free_calls),
        "expires_at": record.expires_at,
        "status": record.status,
        "healthy": not record.in_cooldown(now),
        "created_at": record.created_at,
    }


def private_view(record: ListingRecord, daily_free_calls: int) -> dict[str, Any]:
    view = public_view(record, daily_free_calls)
    view.update(base_url=record.base_url, cooldown_until=record.cooldown_until, updated_at=record.updated_at)
    return view


def _fields(model: BaseModel, *, only_set: bool) -> dict[str, Any]:
    values = model.model_dump(exclude_unset=only_set)
    for key in ("price_per_call", "price_input_per_mtok", "price_output_per_mtok"):
        if key in values and values[key] is not None:
            values[key] = to_atomic(values[key])
    return values


@router.get("", response_model=ListingList, summary="Search live listings", responses=errors(400))
async def search(
    runtime: RuntimeDep,
    model: ModelRef | None = None,
    max_price: Annotated[Decimal | None, Query(ge=0, le=MAX_PRICE, description="USDC per call")] = None,
    min_remaining_calls: Annotated[int | None, Query(ge=0, le=10**12)] = None,
    sort: Literal["price", "-price", "remaining", "-remaining", "newest", "oldest"] = "price",
    limit: PageSize = 50,
    offset: Offset = 0,
) -> dict[str, Any]:
    records = await runtime.store.search_listings(
        model=model,
        max_price=None if max_price is None else int(max_price * ATOMIC),
        min_remaining=min_remaining_calls,
        sort=sort,
        limit=limit,
        offset=offset,
    )
    daily = runtime.settings.playground_free_calls_per_day
    return {"object": "list", "data": [public_view(r, daily) for r in records]}


@router.post(
    "",
    response_model=ListingPrivate,
    status_code=201,
    summary="Create a listing",
    responses=errors(400, 401, 502),
)
async def create(body: ListingCreate, owner: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    fields = _fields(body, only_set=False)
    if fields["api_key"] is None:  # a sandbox listing calls no upstream
        fields["api_key"] = "sandbox"
    record = await runtime.listings.create(owner, fields)
    return private_view(record, runtime.settings.playground_free_calls_per_day)


@router.get(
    "/mine",
    response_model=ListingPrivateList,
    summary="The signed-in provider's listings",
    responses=errors(401),
)
async def mine(owner: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    records = await runtime.store.search_listings(owner=owner, live_only=False, sort="newest", limit=10_000)
    daily = runtime.settings.playground_free_calls_per_day
    return {"object": "list", "data": [private_view(r, daily) for r in records]}


@router.get("/{listing_id}", response_model=ListingPublic, summary="One listing", responses=errors(400, 404))
async def get_one(listing_id: ListingId, runtime: RuntimeDep) -> dict[str, Any]:
    record = await runtime.store.get_listing(listing_id)
    if record is None or record.status == "revoked":
        raise NotFound(f"No listing {listing_id}", code="listing_not_found")
    return public_view(record, runtime.settings.playground_free_calls_per_day)


_OWNER_ONLY = errors(400, 401, 403, 404)


@router.patch(
    "/{listing_id}",
    response_model=ListingPrivate,
    summary="Change a listing (owner only)",
    responses=errors(400, 401, 403, 404, 502),
)
async def update(
    listing_id: ListingId, body: ListingUpdate, owner: CurrentProvider, runtime: RuntimeDep
) -> dict[str, Any]:
    changes = _fields(body, only_set=True)
    if not changes:
        raise BadRequest("Nothing to change")
    record = await runtime.listings.update(owner, listing_id, changes)
    return private_view(record, runtime.settings.playground_free_calls_per_day)


@router.post(
    "/{listing_id}/pause",
    response_model=ListingPrivate,
    summary="Pause a listing (owner only)",
    responses=_OWNER_ONLY,
)
async def pause(listing_id: ListingId, owner: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    record = await runtime.listings.set_status(owner, listing_id, "paused")
    return private_view(record, runtime.settings.playground_free_calls_per_day)


@router.post(
    "/{listing_id}/resume",
    response_model=ListingPrivate,
    summary="Resume a paused listing (owner only)",
    responses=_OWNER_ONLY,
)
async def resume(listing_id: ListingId, owner: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    record = await runtime.listings.set_status(owner, listing_id, "active")
    return private_view(record, runtime.settings.playground_free_calls_per_day)


@router.delete(
    "/{listing_id}",
    response_model=ListingPrivate,
    summary="Revoke a listing for good (owner only)",
    responses=_OWNER_ONLY,
)
async def revoke(listing_id: ListingId, owner: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    record = await runtime.listings.set_status(owner, listing_id, "revoked")
    return private_view(record, runtime.settings.playground_free_calls_per_day)
