"""Apps (Quota's model): a developer's apps with a markup and keys, their end users (spend limits,
usage), grants, analytics, and `GET /v1/balance` with an API key. Amounts are USDC strings with 6
decimals, each beside its `*_atomic` integer.

Managing apps and their keys takes the developer's sign-in session; reading an app's users,
usage, analytics and balance, setting limits and granting also take the app's own API key."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Final, Literal

from eth_utils import to_checksum_address
from fastapi import APIRouter, Depends, Header, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from quotra.api.account import (
    ApiKeyCreated,
    ApiKeyList,
    RatePerMinute,
    RegisterPermission,
    TypedDataResponse,
    UsageList,
    Usdc,
    key_view,
    list_page,
    usage_page,
)
from quotra.api.deps import SESSION_PREFIX, CurrentProvider, RuntimeDep, bearer_token
from quotra.api.routing import BoundedRoute, errors
from quotra.bounds import PRINTABLE, Name
from quotra.calls.records import CALL_ID_PATTERN
from quotra.errors import AuthenticationFailed, BadRequest, NotFound
from quotra.money import atomic, money_fields
from quotra.payments.apps import AppService
from quotra.payments.prepaid import KEY_PREFIX, MAX_MARKUP_BPS
from quotra.store.apps_repo import AppView, GrantView, Totals, UserView
from quotra.store.prepaid_repo import KeyRef

router = APIRouter(tags=["apps"], route_class=BoundedRoute)

# An end user's id as the app knows it: what `X-Quotra-User` and `/v1/users/{id}/…` carry.
USER_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:@+=\-]{0,127}$"
AppId = Annotated[str, Path(pattern=r"^app_[0-9a-f]{16}$")]
UserId = Annotated[str, Path(pattern=USER_ID_PATTERN, description="The end user's id in the app")]
MarkupPercent = Annotated[
    Decimal, Field(ge=0, le=Decimal(MAX_MARKUP_BPS) / 100, decimal_places=2, description="Percent")
]


def _apps(runtime: Any) -> AppService:
    service: AppService = runtime.apps
    return service


def _bps(percent: Decimal) -> int:
    return int(percent * 100)


# ---- who is asking: the developer's session, or one of its keys ---------------------------------


@dataclass(frozen=True)
class Principal:
    wallet: str
    key: KeyRef | None  # None: signed in with Ethereum

    def may_read(self, app: AppView) -> bool:
        """The app's owner signed in, or one of the owner's keys (the app's own, or a plain one)."""
        if self.wallet != app.owner:
            return False
        return self.key is None or self.key.app_id in (None, app.id)


async def principal(request: Request, runtime: RuntimeDep) -> Principal:
    token = bearer_token(request)
    if token is None:
        raise AuthenticationFailed("Use an app's API key (sk-quotra-…) or a sign-in session token")
    if token.startswith(SESSION_PREFIX):
        address = runtime.sessions.verify(token)
        if address is None:
            raise AuthenticationFailed("The session token is invalid or expired", code="invalid_session")
        return Principal(address, None)
    if token.startswith(KEY_PREFIX):
        key = await runtime.prepaid.authenticate(token)
        return Principal(key.wallet, key)
    raise AuthenticationFailed("Use an app's API key (sk-quotra-…) or a sign-in session token")


KeyOrSession = Annotated[Principal, Depends(principal)]


async def _readable_app(who: Principal, runtime: Any, app_id: str) -> AppView:
    app = await _apps(runtime).repo.get_app(app_id)
    if app is None or not who.may_read(app):
        raise NotFound(f"No app '{app_id}' for these credentials", code="app_not_found")
    return app


# ---- models -------------------------------------------------------------------------------------


class CreateApp(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=PRINTABLE)
    markup_percent: MarkupPercent = Field(
        default=Decimal(0), description="Added to every call's base cost; all of it is yours"
    )


class UpdateApp(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=100, pattern=PRINTABLE)
    markup_percent: MarkupPercent | None = None


class AppPublic(BaseModel):
    id: str
    object: str = "app"
    name: str
    owner: str
    markup_percent: str
    markup_bps: int
    permission_allows_markup: bool = Field(
        description="Whether your active spend permission lets this markup be paid to you; if not, "
        "sign one with GET /v1/account/permission/typed-data?max_markup_bps=<markup_bps>"
    )
    created_at: datetime
    updated_at: datetime


class AppList(BaseModel):
    object: str = "list"
    data: list[AppPublic]


async def app_view(service: AppService, app: AppView) -> dict[str, Any]:
    return {
        "id": app.id,
        "object": "app",
        "name": app.name,
        "owner": app.owner,
        "markup_percent": f"{Decimal(app.markup_bps) / 100:.2f}",
        "markup_bps": app.markup_bps,
        "permission_allows_markup": await service.permission_allows(app.owner, app.markup_bps),
        "created_at": app.created_at,
        "updated_at": app.updated_at,
    }


class CreateAppKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name = ""
    mode: Literal["live", "test", "sandbox"] = Field(
        default="live", description="live: real USDC; test (or sandbox): synthetic answers, test money"
    )
    spend_cap: Usdc | None = Field(default=None, description="Most this key may spend in total (USDC)")
    rate_per_minute: RatePerMinute | None = Field(
        default=None, description="Requests per minute; null: the relay's default for keys"
    )


class AppUserPublic(BaseModel):
    id: str
    object: str = "app_user"
    app_id: str
    granted: str = Field(description="Grants given, in all")
    granted_atomic: int
    grant_used: str
    grant_used_atomic: int
    grant_remaining: str = Field(description="Spent before the user's own money")
    grant_remaining_atomic: int
    spent: str = Field(description="The user's own spending (beyond its grants)")
    spent_atomic: int
    reserved: str
    reserved_atomic: int
    spend_limit: str | None = Field(description="Most the user's own money may spend; null: no limit")
    spend_limit_atomic: int | None
    limit_remaining: str | None
    limit_remaining_atomic: int | None
    wallet: str | None = Field(description="Connected: the user pays from this wallet's deposit…")
    permission_digest: str | None = Field(description="…within this permission it signed for the app")


class AppUserList(BaseModel):
    object: str = "list"
    data: list[AppUserPublic]
    has_more: bool
    next_after: str | None = Field(description="Pass as `after` for the next page")


def _optional_money(name: str, amount: int | None) -> dict[str, Any]:
    return {name: None, f"{name}_atomic": None} if amount is None else money_fields(name, amount)


def user_view(user: UserView) -> dict[str, Any]:
    return {
        "id": user.external_id,
        "object": "app_user",
        "app_id": user.app_id,
        **money_fields("granted", user.granted),
        **money_fields("grant_used", user.grant_used),
        **money_fields("grant_remaining", user.grant_remaining),
        **money_fields("spent", user.spent),
        **money_fields("reserved", user.reserved),
        **_optional_money("spend_limit", user.spend_limit),
        **_optional_money("limit_remaining", user.limit_remaining),
        "wallet": user.wallet,
        "permission_digest": user.permission_digest,
    }


# A spend limit may be zero: the user spends only what it is granted.
SpendLimit = Annotated[Decimal, Field(ge=0, le=Decimal(10**9), decimal_places=6, description="USDC")]


class SetLimit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spend_limit: SpendLimit | None = Field(
        description="USDC the user's own money may spend in all (0: grants only); null: no limit"
    )


class GrantRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    external_user_id: str | None = Field(default=None, pattern=USER_ID_PATTERN)
    wallet: str | None = Field(default=None, pattern=r"^0x[0-9a-fA-F]{40}$")
    amount: Usdc
    description: str = Field(default="", max_length=300, pattern=PRINTABLE)
    tx_hash: str | None = Field(
        default=None,
        pattern=r"^0x[0-9a-fA-F]{64}$",
        description="For a wallet: your escrow.deposit(amount, wallet) transaction",
    )
    app_id: str | None = Field(
        default=None, pattern=r"^app_[0-9a-f]{16}$", description="With a session token: the app granting"
    )

    @model_validator(mode="after")
    def _one_recipient(self) -> GrantRequest:
        if (self.external_user_id is None) == (self.wallet is None):
            raise ValueError("give exactly one of external_user_id or wallet")
        return self


class GrantPublic(BaseModel):
    id: str
    object: str = "grant"
    app_id: str
    external_user_id: str | None
    wallet: str | None
    amount: str
    amount_atomic: int
    description: str
    tx_hash: str | None
    created_at: datetime
    user: AppUserPublic | None = Field(description="A hosted user after the grant")


class GrantList(BaseModel):
    object: str = "list"
    data: list[GrantPublic]


def grant_view(grant: GrantView, user: UserView | None = None) -> dict[str, Any]:
    return {
        "id": grant.id,
        "object": "grant",
        "app_id": grant.app_id,
        "external_user_id": grant.external_user_id,
        "wallet": grant.wallet,
        **money_fields("amount", grant.amount),
        "description": grant.description,
        "tx_hash": grant.tx_hash,
        "created_at": grant.created_at,
        "user": None if user is None else user_view(user),
    }


class UserBalance(BaseModel):
    id: str
    granted: str
    granted_atomic: int
    grant_used: str
    grant_used_atomic: int
    grant_remaining: str
    grant_remaining_atomic: int
    spent: str
    spent_atomic: int
    reserved: str
    reserved_atomic: int
    spend_limit: str | None
    spend_limit_atomic: int | None
    limit_remaining: str | None
    limit_remaining_atomic: int | None
    available: str = Field(description="What this user's calls can reserve now")
    available_atomic: int


class KeyMeter(BaseModel):
    id: str
    mode: Literal["live", "sandbox"] = Field(description="sandbox: test money, metered here only")
    spend_cap: str | None
    spend_cap_atomic: int | None
    spent: str
    spent_atomic: int
    reserved: str
    reserved_atomic: int
    remaining: str | None = Field(description="What the key may still spend; null: no cap")
    remaining_atomic: int | None


class BalanceResponse(BaseModel):
    object: str = "balance"
    wallet: str
    app: str | None
    key: KeyMeter | None = Field(description="The API key asking: its own meter (sandbox keys' test money)")
    available: str = Field(description="What your calls can reserve now (grants included)")
    available_atomic: int
    deposit: str
    deposit_atomic: int
    reserved: str
    reserved_atomic: int
    unsettled: str
    unsettled_atomic: int
    grants_outstanding: str = Field(description="Your hosted users' grants not spent yet")
    grants_outstanding_atomic: int
    user: UserBalance | None


def balance_view(raw: dict[str, Any]) -> dict[str, Any]:
    view: dict[str, Any] = {"object": "balance", "wallet": raw["wallet"], "app": raw["app"]}
    for name in ("available", "deposit", "reserved", "unsettled", "grants_outstanding"):
        view.update(money_fields(name, raw[name]))
    user = raw["user"]
    if user is not None:
        user_out: dict[str, Any] = {"id": user["id"]}
        for name in ("granted", "grant_used", "grant_remaining", "spent", "reserved", "available"):
            user_out.update(money_fields(name, user[name]))
        for name in ("spend_limit", "limit_remaining"):
            user_out.update(_optional_money(name, user[name]))
        user = user_out
    view["user"] = user
    key = raw["key"]
    if key is not None:
        key = {
            "id": key.id,
            "mode": key.mode,
            **_optional_money("spend_cap", key.spend_cap),
            **money_fields("spent", key.spent),
            **money_fields("reserved", key.reserved),
            **_optional_money("remaining", key.remaining),
        }
    view["key"] = key
    return view


class TotalsPublic(BaseModel):
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost: str = Field(description="What was charged: base cost plus markup")
    cost_atomic: int
    base_cost: str = Field(description="The providers' and the platform's part")
    base_cost_atomic: int
    markup_revenue: str = Field(description="Your part: the markup, all of it")
    markup_revenue_atomic: int
    granted: str = Field(description="Paid by grants")
    granted_atomic: int


class UserTotals(TotalsPublic):
    end_user: str | None


class Analytics(BaseModel):
    object: str = "app.analytics"
    app_id: str
    mode: Literal["live", "sandbox"]
    start: datetime
    end: datetime
    totals: TotalsPublic
    end_users: list[UserTotals]


def totals_view(totals: Totals) -> dict[str, Any]:
    return {
        "calls": totals.calls,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        **money_fields("cost", totals.charged),
        **money_fields("base_cost", totals.base),
        **money_fields("markup_revenue", totals.markup),
        **money_fields("granted", totals.granted),
    }


# ---- apps and their keys (the developer, signed in) ---------------------------------------------


@router.post(
    "/v1/apps",
    response_model=AppPublic,
    status_code=201,
    summary="Create an app with a markup",
    responses=errors(400, 401),
)
async def create_app(body: CreateApp, wallet: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    service = _apps(runtime)
    app = await service.create_app(wallet, name=body.name, markup_bps=_bps(body.markup_percent))
    return await app_view(service, app)


@router.get("/v1/apps", response_model=AppList, summary="Your apps", responses=errors(401))
async def list_apps(wallet: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    service = _apps(runtime)
    return {
        "object": "list",
        "data": [await app_view(service, a) for a in await service.repo.list_apps(wallet)],
    }


@router.get(
    "/v1/apps/{app_id}", response_model=AppPublic, summary="One of your apps", responses=errors(400, 401, 404)
)
async def get_app(app_id: AppId, who: KeyOrSession, runtime: RuntimeDep) -> dict[str, Any]:
    return await app_view(_apps(runtime), await _readable_app(who, runtime, app_id))


@router.patch(
    "/v1/apps/{app_id}",
    response_model=AppPublic,
    summary="Rename an app or change its markup",
    responses=errors(400, 401, 404),
)
async def update_app(
    app_id: AppId, body: UpdateApp, wallet: CurrentProvider, runtime: RuntimeDep
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if body.name is not None:
        values["name"] = body.name
    if body.markup_percent is not None:
        values["markup_bps"] = _bps(body.markup_percent)
    service = _apps(runtime)
    return await app_view(service, await service.update_app(wallet, app_id, **values))


@router.post(
    "/v1/apps/{app_id}/keys",
    response_model=ApiKeyCreated,
    status_code=201,
    summary="Create an app key (shown once): its calls bill your deposit with the app's markup",
    responses=errors(400, 401, 404),
)
async def create_app_key(
    app_id: AppId, body: CreateAppKey, wallet: CurrentProvider, runtime: RuntimeDep
) -> dict[str, Any]:
    view, secret = await _apps(runtime).create_key(
        wallet,
        app_id,
        name=body.name,
        mode="live" if body.mode == "live" else "sandbox",
        spend_cap=None if body.spend_cap is None else atomic(body.spend_cap),
        rate_per_minute=body.rate_per_minute,
    )
    return {**key_view(view), "key": secret}


@router.get(
    "/v1/apps/{app_id}/keys",
    response_model=ApiKeyList,
    summary="An app's keys (never secrets)",
    responses=errors(400, 401, 404),
)
async def list_app_keys(app_id: AppId, wallet: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    keys = await _apps(runtime).keys(wallet, app_id)
    return {"object": "list", "data": [key_view(k) for k in keys]}


# ---- end users (the developer, or the app's key) ------------------------------------------------


@router.get(
    "/v1/apps/{app_id}/users",
    response_model=AppUserList,
    summary="An app's end users",
    responses=errors(400, 401, 404),
)
async def list_users(
    app_id: AppId,
    who: KeyOrSession,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    after: Annotated[str | None, Query(pattern=USER_ID_PATTERN)] = None,
) -> dict[str, Any]:
    app = await _readable_app(who, runtime, app_id)
    users = await _apps(runtime).repo.users(app.id, limit=limit + 1, after=after)
    return list_page(users, limit, user_view, ("next_after", lambda user: user.external_id))


@router.get(
    "/v1/apps/{app_id}/users/{user_id}",
    response_model=AppUserPublic,
    summary="One end user",
    responses=errors(400, 401, 404),
)
async def get_user(app_id: AppId, user_id: UserId, who: KeyOrSession, runtime: RuntimeDep) -> dict[str, Any]:
    app = await _readable_app(who, runtime, app_id)
    return user_view(await _apps(runtime).repo.user(app.id, user_id))


@router.put(
    "/v1/apps/{app_id}/users/{user_id}/limit",
    response_model=AppUserPublic,
    summary="Set (or, with null, remove) an end user's spend limit",
    responses=errors(400, 401, 404),
)
async def set_limit(
    app_id: AppId, user_id: UserId, body: SetLimit, who: KeyOrSession, runtime: RuntimeDep
) -> dict[str, Any]:
    app = await _readable_app(who, runtime, app_id)
    limit = None if body.spend_limit is None else atomic(body.spend_limit)
    return user_view(await _apps(runtime).repo.set_limit(app.id, user_id, limit))


@router.get(
    "/v1/apps/{app_id}/users/{user_id}/wallet/typed-data",
    response_model=TypedDataResponse,
    summary="The SpendPermission an end user's wallet signs to pay this app's calls itself",
    responses=errors(400, 401, 404, 503),
)
async def wallet_typed_data(
    app_id: AppId,
    user_id: UserId,
    who: KeyOrSession,
    runtime: RuntimeDep,
    wallet: Annotated[str, Query(pattern=r"^0x[0-9a-fA-F]{40}$", description="The user's wallet")],
    allowance: Annotated[Usdc, Query(description="Most the app's calls may charge it in total (USDC)")],
    days: Annotated[int, Query(ge=1, le=365)] = 30,
) -> dict[str, Any]:
    app = await _readable_app(who, runtime, app_id)
    return _apps(runtime).prepaid.permission_typed_data(
        to_checksum_address(wallet), atomic(allowance), days, app.markup_bps, developer=app.owner
    )


@router.post(
    "/v1/apps/{app_id}/users/{user_id}/wallet",
    response_model=AppUserPublic,
    summary="Connect an end user's wallet: its calls are charged to its own deposit (user billing)",
    responses=errors(400, 401, 404, 503),
)
async def connect_wallet(
    app_id: AppId, user_id: UserId, body: RegisterPermission, who: KeyOrSession, runtime: RuntimeDep
) -> dict[str, Any]:
    app = await _readable_app(who, runtime, app_id)
    user = await _apps(runtime).connect_wallet(app, user_id, body.permission.model_dump(), body.signature)
    return user_view(user)


@router.delete(
    "/v1/apps/{app_id}/users/{user_id}/wallet",
    response_model=AppUserPublic,
    summary="Unlink an end user's wallet: the user is hosted again (its calls bill your deposit)",
    description="The wallet's permission for the app is never charged again (calls already served "
    "still settle). The user's calls are billed to you again, within its grants and spend limit "
    "(a limit of 0: grants only, then 402).",
    responses={
        **errors(400, 401),
        404: {
            **errors(404)[404],
            "description": "No such app for these credentials, or no wallet "
            "connected for this user (`wallet_not_connected`)",
        },
    },
)
async def disconnect_wallet(
    app_id: AppId, user_id: UserId, who: KeyOrSession, runtime: RuntimeDep
) -> dict[str, Any]:
    app = await _readable_app(who, runtime, app_id)
    return user_view(await _apps(runtime).disconnect_user(app, user_id))


@router.get(
    "/v1/apps/{app_id}/users/{user_id}/usage",
    response_model=UsageList,
    summary="An end user's calls, newest first (grants' part and markup included)",
    responses=errors(400, 401, 404),
)
async def user_usage(
    app_id: AppId,
    user_id: UserId,
    who: KeyOrSession,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[str | None, Query(pattern=CALL_ID_PATTERN)] = None,
) -> dict[str, Any]:
    app = await _readable_app(who, runtime, app_id)
    return usage_page(
        await _apps(runtime).repo.user_calls(app.id, user_id, limit=limit + 1, before=before), limit
    )


@router.get(
    "/v1/apps/{app_id}/grants",
    response_model=GrantList,
    summary="An app's grants, newest first",
    responses=errors(400, 401, 404),
)
async def list_grants(
    app_id: AppId,
    who: KeyOrSession,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> dict[str, Any]:
    app = await _readable_app(who, runtime, app_id)
    return {
        "object": "list",
        "data": [grant_view(g) for g in await _apps(runtime).repo.grants(app.id, limit=limit)],
    }


@router.get(
    "/v1/apps/{app_id}/analytics",
    response_model=Analytics,
    summary="Usage, cost and markup revenue of an app and of each end user over a time range",
    responses=errors(400, 401, 404),
)
async def analytics(
    app_id: AppId,
    who: KeyOrSession,
    runtime: RuntimeDep,
    start: Annotated[datetime | None, Query(description="Inclusive; default: 30 days before `end`")] = None,
    end: Annotated[datetime | None, Query(description="Exclusive; default: now")] = None,
    mode: Annotated[
        Literal["live", "sandbox"], Query(description="Real calls, or sandbox keys' ones")
    ] = "live",
) -> dict[str, Any]:
    app = await _readable_app(who, runtime, app_id)
    end = _aware(end) if end is not None else datetime.now(UTC)
    start = _aware(start) if start is not None else end - timedelta(days=30)
    if start >= end:
        raise BadRequest("`start` must be before `end`", param="start")
    totals, per_user = await _apps(runtime).repo.analytics(app.id, start, end, sandbox=mode == "sandbox")
    return {
        "object": "app.analytics",
        "app_id": app.id,
        "mode": mode,
        "start": start,
        "end": end,
        "totals": totals_view(totals),
        "end_users": [
            {"end_user": user or None, **totals_view(t)}
            for user, t in sorted(per_user.items(), key=lambda item: (-item[1].charged, item[0]))
        ],
    }


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# ---- the apps a wallet pays for (the end user, signed in) ---------------------------------------


class AppConnection(BaseModel):
    object: str = "app_connection"
    app_id: str
    app_name: str
    developer: str = Field(description="Paid the app's markup out of your calls")
    user_id: str = Field(description="Your id in the app")
    markup_bps: int
    permission_digest: str | None
    allowance: str = Field(description="Most the app's calls may charge you, in all")
    allowance_atomic: int
    remaining: str = Field(description="What the app's calls may still charge you")
    remaining_atomic: int
    valid_until: int | None = Field(description="Unix seconds")
    revoked: bool = Field(description="Revoked on-chain: the app's calls for you are refused (402)")


class AppConnectionList(BaseModel):
    object: str = "list"
    data: list[AppConnection]


class AppDisconnected(BaseModel):
    object: str = "app_connection.deleted"
    app_id: str
    user_ids: list[str] = Field(description="Your ids in the app that were connected")
    deleted: bool = True


@router.get(
    "/v1/account/apps",
    response_model=AppConnectionList,
    summary="The apps your wallet pays for (as their end user), each under its own permission",
    responses=errors(401),
)
async def list_connections(wallet: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    data = []
    for app, user, permission in await _apps(runtime).repo.connections(wallet):
        usable = permission is not None and permission.revoked_at is None
        data.append(
            {
                "object": "app_connection",
                "app_id": app.id,
                "app_name": app.name,
                "developer": app.owner,
                "user_id": user.external_id,
                "markup_bps": app.markup_bps,
                "permission_digest": user.permission_digest,
                **money_fields("allowance", 0 if permission is None else permission.allowance),
                **money_fields("remaining", max(0, permission.remaining) if usable and permission else 0),
                "valid_until": None if permission is None else permission.valid_until,
                "revoked": not usable,
            }
        )
    return {"object": "list", "data": data}


@router.delete(
    "/v1/account/apps/{app_id}",
    response_model=AppDisconnected,
    summary="Disconnect an app: it no longer charges your wallet",
    description="Every user of the app your wallet paid for is disconnected, and its permission is "
    "never charged again by this relay (calls already served still settle). The app may go on "
    "serving those users at its own expense (developer billing). To revoke the permission "
    "on-chain too: `revoke_permission` from your wallet, or a signed `Revocation` to "
    "POST /v1/revocations.",
    responses={
        **errors(400, 401),
        404: {
            **errors(404)[404],
            "description": "Your wallet is not connected to this app (`app_not_connected`)",
        },
    },
)
async def disconnect_app(app_id: AppId, wallet: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    users = await _apps(runtime).disconnect_app(wallet, app_id)
    return {"object": "app_connection.deleted", "app_id": app_id, "user_ids": users, "deleted": True}


# ---- grants and balances ------------------------------------------------------------------------


@router.post(
    "/v1/funding/grant",
    response_model=GrantPublic,
    status_code=201,
    summary="Give an end user free balance, spent before its own money",
    responses=errors(400, 401, 402, 404, 503),
)
async def grant(body: GrantRequest, who: KeyOrSession, runtime: RuntimeDep) -> dict[str, Any]:
    app_id = body.app_id or (who.key.app_id if who.key is not None else None)
    if app_id is None:
        raise BadRequest("Use an app's key, or give `app_id` with a session token", param="app_id")
    app = await _readable_app(who, runtime, app_id)
    amount = atomic(body.amount)
    service = _apps(runtime)
    if body.external_user_id is not None:
        made, user = await service.grant_user(app, body.external_user_id, amount, body.description)
        return grant_view(made, user)
    assert body.wallet is not None
    return grant_view(await service.grant_wallet(app, body.wallet, amount, body.description, body.tx_hash))


@router.get(
    "/v1/balance",
    response_model=BalanceResponse,
    summary="Your balance with an API key (and an end user's, with `user` or X-Quotra-User)",
    responses=errors(400, 401, 404),
)
async def balance(
    who: KeyOrSession,
    runtime: RuntimeDep,
    user: Annotated[
        str | None, Query(pattern=USER_ID_PATTERN, description="An end user of the key's app")
    ] = None,
    app_id: Annotated[str | None, Query(pattern=r"^app_[0-9a-f]{16}$", description="With a session")] = None,
    x_quotra_user: Annotated[str | None, Header(pattern=USER_ID_PATTERN)] = None,
) -> dict[str, Any]:
    end_user = user or x_quotra_user
    app_id = app_id or (who.key.app_id if who.key is not None else None)
    app = None if app_id is None else await _readable_app(who, runtime, app_id)
    if end_user is not None and app is None:
        raise BadRequest("An end user's balance needs an app's key (or `app_id`)", param="user")
    raw = await _apps(runtime).balance(who.wallet, app, end_user)
    raw["key"] = None if who.key is None else await _apps(runtime).prepaid.repo.key_view(who.key.id)
    return balance_view(raw)
