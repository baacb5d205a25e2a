"""The consumer's prepaid account (signed in with Ethereum): balance, spend permission, gasless
deposits, API keys and usage. Amounts are USDC strings with 6 decimals, each beside its
`*_atomic` integer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from quotra.api.claims import SignedFrameworkDelegation
from quotra.api.deps import CurrentProvider, RuntimeDep
from quotra.api.routing import BoundedRoute, errors, relayed, submitted
from quotra.bounds import Address, Name, Omittable, PageSize, Uint256
from quotra.calls.records import CALL_ID_PATTERN, CallView, payer_ids
from quotra.chain import delegation as dlg
from quotra.errors import BadRequest, NotFound
from quotra.money import atomic, money_fields, usdc
from quotra.payments.allowances import AllowanceService
from quotra.payments.exits import Exits
from quotra.payments.prepaid import MAX_MARKUP_BPS, PrepaidService
from quotra.store.allowances_repo import AllowanceView
from quotra.store.prepaid_repo import ApiKeyView

router = APIRouter(prefix="/v1/account", tags=["account"], route_class=BoundedRoute)

Usdc = Annotated[Decimal, Field(gt=0, le=Decimal(10**9), decimal_places=6, description="USDC")]
RatePerMinute = Annotated[int, Field(ge=1, le=100_000)]
KeyId = Annotated[str, Path(pattern=r"^key_[0-9a-f]{16}$")]
T = TypeVar("T")


# ---- models -------------------------------------------------------------------------------------


class PermissionState(BaseModel):
    digest: str
    spender: str
    developer: str = Field(description="The app developer its charges may pay a markup (zero: none)")
    max_markup_bps: int
    allowance: str
    allowance_atomic: int
    spent: str
    spent_atomic: int
    valid_after: int
    valid_until: int
    revoked: bool
    active: bool


class AccountResponse(BaseModel):
    object: str = "account"
    wallet: str
    deposit: str
    deposit_atomic: int
    pending_withdrawal: str
    pending_withdrawal_atomic: int
    pending_withdrawal_unlocks_at: int | None = Field(
        description="When the pending withdrawal can be completed (unix seconds), as the chain says"
    )
    reserved: str
    reserved_atomic: int
    unsettled: str = Field(description="Captured, not yet settled on-chain")
    unsettled_atomic: int
    settled_total: str
    settled_total_atomic: int
    remaining_allowance: str
    remaining_allowance_atomic: int
    available: str = Field(description="What calls can reserve now")
    available_atomic: int
    permission: PermissionState | None
    synced_at: datetime | None


def account_view(raw: dict[str, Any]) -> dict[str, Any]:
    view: dict[str, Any] = {
        "object": "account",
        "wallet": raw["wallet"],
        "synced_at": raw["synced_at"],
        "pending_withdrawal_unlocks_at": raw["pending_withdrawal_unlocks_at"],
    }
    for name in (
        "deposit",
        "pending_withdrawal",
        "reserved",
        "unsettled",
        "settled_total",
        "remaining_allowance",
        "available",
    ):
        view.update(money_fields(name, raw[name]))
    permission = raw["permission"]
    if permission is not None:
        permission = {
            **{k: v for k, v in permission.items() if k not in ("allowance", "spent")},
            **money_fields("allowance", permission["allowance"]),
            **money_fields("spent", permission["spent"]),
        }
    view["permission"] = permission
    return view


class ApiKeyPublic(BaseModel):
    id: str
    object: str = "api_key"
    name: str
    mode: Literal["live", "sandbox"]
    app_id: str | None = Field(description="The app this key belongs to (its calls carry its markup)")
    rate_per_minute: int | None = Field(description="This key's rate limit; null: the relay's default")
    spend_cap: str | None
    spend_cap_atomic: int | None
    spent: str
    spent_atomic: int
    reserved: str
    reserved_atomic: int
    remaining: str | None
    remaining_atomic: int | None
    revoked: bool
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_at: datetime


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="The secret, shown only this once")


class ApiKeyList(BaseModel):
    object: str = "list"
    data: list[ApiKeyPublic]


def key_view(view: ApiKeyView) -> dict[str, Any]:
    remaining = view.remaining
    return {
        "id": view.id,
        "object": "api_key",
        "name": view.name,
        "mode": view.mode,
        "app_id": view.app_id,
        "rate_per_minute": view.rate_per_minute,
        "spend_cap": None if view.spend_cap is None else usdc(view.spend_cap),
        "spend_cap_atomic": view.spend_cap,
        **money_fields("spent", view.spent),
        **money_fields("reserved", view.reserved),
        "remaining": None if remaining is None else usdc(remaining),
        "remaining_atomic": remaining,
        "revoked": view.revoked_at is not None,
        "revoked_at": view.revoked_at,
        "last_used_at": view.last_used_at,
        "created_at": view.created_at,
    }


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name = ""
    mode: Literal["live", "sandbox"] = "live"
    spend_cap: Usdc | None = Field(default=None, description="Most this key may spend in total (USDC)")


class UpdateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Omittable[Name] = None
    spend_cap: Usdc | None = Field(default=None, description="New cap (USDC); null removes the cap")
    rate_per_minute: RatePerMinute | None = Field(
        default=None, description="Requests per minute for this key; null: the relay's default"
    )


class UsageEntry(BaseModel):
    id: str
    object: str = "quotra.call"
    gate: str = Field(description="prepaid | sandbox | x402 | playground")
    api_key_id: str | None
    app_id: str | None
    end_user: str | None
    listing_id: str
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    reserved: str = Field(description="What was reserved for the call (x402: the amount authorized)")
    reserved_atomic: int
    price: str = Field(description="What the call was charged: what it used, at most what was reserved")
    price_atomic: int
    returned_to_deposit: str = Field(
        description="x402: the rest of the authorization, credited to the payer's escrow deposit "
        "when the payment settles"
    )
    returned_to_deposit_atomic: int
    markup: str = Field(description="The app developer's part of the price")
    markup_atomic: int
    granted: str = Field(description="The part of the price the end user's grants paid")
    granted_atomic: int
    status: str = Field(
        description="reserved | captured | settling | reconciling | settled | voided | failed | refunded"
    )
    settlement_tx: str | None
    created_at: datetime


class UsageList(BaseModel):
    object: str = "list"
    data: list[UsageEntry]
    has_more: bool
    next_before: str | None = Field(description="Pass as `before` for the next (older) page")


def list_page(
    rows: Sequence[T], limit: int, view: Callable[[T], dict[str, Any]], cursor: tuple[str, Callable[[T], str]]
) -> dict[str, Any]:
    """A page of a list as the API answers it, from up to `limit + 1` rows read (one more than
    shown tells whether there are more): the rows' views, `has_more`, and the cursor to pass for
    the next page (`cursor`: its field's name, and how a row gives it)."""
    page = rows[:limit]
    has_more = len(rows) > limit
    name, of = cursor
    return {
        "object": "list",
        "data": [view(r) for r in page],
        "has_more": has_more,
        name: of(page[-1]) if has_more and page else None,
    }


def usage_page(calls: Sequence[CallView], limit: int) -> dict[str, Any]:
    """A page of calls, newest first (`UsageList`)."""
    return list_page(calls, limit, usage_view, ("next_before", lambda call: call.id))


def usage_view(call: CallView) -> dict[str, Any]:
    return {
        "id": call.id,
        "object": "quotra.call",
        "gate": call.gate,
        "api_key_id": call.key_id,
        "app_id": call.app_id,
        "end_user": call.end_user,
        "listing_id": call.listing_id,
        "provider": call.provider,
        "model": call.model,
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens,
        **money_fields("reserved", call.reserved),
        **money_fields("price", call.amount if call.metered else 0),
        **money_fields("returned_to_deposit", call.returned),
        **money_fields("markup", call.markup if call.metered else 0),
        **money_fields("granted", call.granted if call.metered else 0),
        "status": call.state,
        "settlement_tx": call.tx_hash if call.state == "settled" else None,
        "created_at": call.created_at,
    }


class SpendPermissionFields(BaseModel):
    """The EIP-712 `SpendPermission` message; uint256 values as integers or decimal/0x strings."""

    consumer: Address
    spender: Address
    allowance: Uint256
    valid_after: Uint256
    valid_until: Uint256
    salt: Uint256
    developer: Address = Field(default="0x" + "00" * 20, description="An app developer (zero: none)")
    max_markup_bps: Uint256 = Field(default=0, description="The most markup it may be paid")


HexSignature = Annotated[
    str, Field(min_length=2, max_length=1000, pattern=r"^0x[0-9a-fA-F]*$", description="0x-hex")
]


class RegisterPermission(BaseModel):
    permission: SpendPermissionFields
    signature: HexSignature


class TypedDataResponse(BaseModel):
    typed_data: dict[str, Any] = Field(description="Sign with eth_signTypedData_v4")
    digest: str


class Eip3009Fields(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: Address = Field(alias="from")
    to: Address
    value: Uint256
    validAfter: Uint256  # EIP-3009's spelling
    validBefore: Uint256
    nonce: Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{64}$")]


class DepositRequest(BaseModel):
    authorization: Eip3009Fields = Field(description="A ReceiveWithAuthorization to the escrow")
    signature: Annotated[HexSignature, Field(max_length=200)]


class DepositResponse(BaseModel):
    status: Literal["confirmed", "submitted"]
    tx_hash: str | None
    amount: str
    amount_atomic: int
    account: AccountResponse | None


# ---- routes -------------------------------------------------------------------------------------


def _prepaid(runtime: Any) -> PrepaidService:
    prepaid: PrepaidService = runtime.prepaid
    return prepaid


@router.get(
    "",
    response_model=AccountResponse,
    summary="The prepaid account (refreshed from the chain)",
    responses=errors(401),
)
async def get_account(wallet: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    return account_view(await _prepaid(runtime).account(wallet))


@router.get(
    "/usage",
    response_model=UsageList,
    summary="The wallet's calls (any gate), newest first",
    responses=errors(400, 401),
)
async def usage(
    wallet: CurrentProvider,
    runtime: RuntimeDep,
    limit: PageSize = 50,
    before: Annotated[
        str | None, Query(pattern=CALL_ID_PATTERN, description="`next_before` of the previous page")
    ] = None,
) -> dict[str, Any]:
    return usage_page(await runtime.calls.of_payer(payer_ids(wallet), limit=limit + 1, before=before), limit)


@router.get(
    "/permission/typed-data",
    response_model=TypedDataResponse,
    summary="The SpendPermission to sign (spender = this relay's operator)",
    responses=errors(400, 401, 404),
)
async def permission_typed_data(
    wallet: CurrentProvider,
    runtime: RuntimeDep,
    allowance: Annotated[Usdc, Query(description="Most the relay may charge in total (USDC)")],
    days: Annotated[int, Query(ge=1, le=365)] = 30,
    max_markup_bps: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_MARKUP_BPS,
            description="The most markup of your own apps it may pay you (default: your apps' highest)",
        ),
    ] = None,
) -> dict[str, Any]:
    if max_markup_bps is None:
        max_markup_bps = await runtime.apps.repo.highest_markup(wallet)
    return _prepaid(runtime).permission_typed_data(wallet, atomic(allowance), days, max_markup_bps)


@router.post(
    "/permission",
    response_model=AccountResponse,
    summary="Register a signed SpendPermission (becomes the active one)",
    responses=errors(400, 401, 404, 503),
)
async def register_permission(
    body: RegisterPermission, wallet: CurrentProvider, runtime: RuntimeDep
) -> dict[str, Any]:
    raw = await _prepaid(runtime).register_permission(wallet, body.permission.model_dump(), body.signature)
    return account_view(raw)


@router.get(
    "/permission/revocation/typed-data",
    response_model=TypedDataResponse,
    summary="The Revocation of your spend permission to sign (then POST /v1/revocations)",
    responses=errors(400, 401, 404, 503),
)
async def permission_revocation_typed_data(
    wallet: CurrentProvider,
    runtime: RuntimeDep,
    digest: Annotated[
        str | None,
        Query(
            pattern=r"^0x[0-9a-fA-F]{64}$",
            description="Another of your permissions (one you connected to an app); default: your active one",
        ),
    ] = None,
) -> dict[str, Any]:
    return await _prepaid(runtime).revocation_typed_data(wallet, digest)


@router.get(
    "/deposits/typed-data",
    response_model=TypedDataResponse,
    summary="A ReceiveWithAuthorization to the escrow to sign for a gasless deposit",
    responses=errors(400, 401, 404, 503),
)
async def deposit_typed_data(
    wallet: CurrentProvider,
    runtime: RuntimeDep,
    amount: Annotated[Usdc, Query(description="USDC to deposit")],
) -> dict[str, Any]:
    return await _prepaid(runtime).deposit_typed_data(wallet, atomic(amount))


@router.post(
    "/deposits",
    response_model=DepositResponse,
    summary="Gasless deposit: the relayer submits your ReceiveWithAuthorization",
    responses=relayed(DepositResponse, 400, 401, 404, 503),
)
async def deposit(
    body: DepositRequest, wallet: CurrentProvider, runtime: RuntimeDep, response: Response
) -> dict[str, Any]:
    authorization = body.authorization.model_dump(by_alias=True)
    result = await _prepaid(runtime).deposit(wallet, authorization, body.signature)
    submitted(response, result)
    account = result["account"]
    return {
        "status": result["status"],
        "tx_hash": result["tx_hash"],
        **money_fields("amount", result["amount"]),
        "account": None if account is None else account_view(account),
    }


@router.get(
    "/keys", response_model=ApiKeyList, summary="Your API keys (never their secrets)", responses=errors(401)
)
async def list_keys(wallet: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    keys = await _prepaid(runtime).repo.list_keys(wallet)
    return {"object": "list", "data": [key_view(k) for k in keys]}


@router.post(
    "/keys",
    response_model=ApiKeyCreated,
    status_code=201,
    summary="Create an API key (shown once)",
    responses=errors(400, 401),
)
async def create_key(body: CreateKey, wallet: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    view, secret = await _prepaid(runtime).create_key(
        wallet,
        name=body.name,
        mode=body.mode,
        spend_cap=None if body.spend_cap is None else atomic(body.spend_cap),
    )
    return {**key_view(view), "key": secret}


@router.patch(
    "/keys/{key_id}",
    response_model=ApiKeyPublic,
    summary="Rename a key or change its spend cap",
    responses=errors(400, 401, 404),
)
async def update_key(
    key_id: KeyId, body: UpdateKey, wallet: CurrentProvider, runtime: RuntimeDep
) -> dict[str, Any]:
    values = body.model_dump(exclude_unset=True)
    if "spend_cap" in values and values["spend_cap"] is not None:
        values["spend_cap"] = atomic(values["spend_cap"])
    try:
        view = await _prepaid(runtime).repo.update_key(wallet, key_id, **values)
    except KeyError:
        raise NotFound(f"No API key '{key_id}' in this account") from None
    return key_view(view)


@router.delete(
    "/keys/{key_id}",
    response_model=ApiKeyPublic,
    summary="Revoke an API key (at once)",
    responses=errors(400, 401, 404),
)
async def revoke_key(key_id: KeyId, wallet: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    try:
        view = await _prepaid(runtime).revoke_key(wallet, key_id)
    except KeyError:
        raise NotFound(f"No API key '{key_id}' in this account") from None
    return key_view(view)


# ---- ETH-free withdrawals -----------------------------------------------------------------------

WithdrawalStep = Literal["request", "cancel", "withdraw"]


class WithdrawalTypedData(BaseModel):
    step: str
    typed_data: dict[str, Any]
    now: int
    deposit: int
    pending: int
    unlock_at: int
    nonce: int


class WithdrawalMessage(BaseModel):
    """A signed RequestWithdrawal / CancelWithdrawal (`amount`) or Withdraw (`relayer_fee`)."""

    model_config = ConfigDict(extra="forbid")

    consumer: Address
    amount: Uint256 | None = None
    relayer_fee: Uint256 | None = None
    nonce: Uint256
    deadline: Uint256


class WithdrawalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: WithdrawalStep
    message: WithdrawalMessage = Field(description="The signed message, as the typed data gave it")
    signature: str = Field(pattern=r"^0x([0-9a-fA-F]{2}){65,2048}$")


class WithdrawalStatus(BaseModel):
    step: str | None = None
    task_id: str
    status: str
    tx_hash: str | None
    error: str | None


def _exits(runtime: Any) -> Exits:
    if runtime.exits is None:
        raise NotFound(
            "ETH-free withdrawals need the chain and a relayer on this relay", code="withdrawals_unavailable"
        )
    exits: Exits = runtime.exits
    return exits


@router.get(
    "/withdrawals/typed-data",
    response_model=WithdrawalTypedData,
    summary="A withdrawal step to sign (request, cancel, or withdraw at the relayer's fee): no ETH needed",
    responses=errors(400, 401, 404, 409, 503),
)
async def withdrawal_typed_data(
    wallet: CurrentProvider,
    runtime: RuntimeDep,
    step: WithdrawalStep,
    amount: Annotated[Usdc | None, Query(description="USDC to request (step=request)")] = None,
) -> dict[str, Any]:
    return await _exits(runtime).typed_data(wallet, step, None if amount is None else atomic(amount))


@router.post(
    "/withdrawals",
    response_model=WithdrawalStatus,
    summary="Submit a signed withdrawal step through the relayer (ETH-free exit)",
    responses=relayed(WithdrawalStatus, 400, 401, 403, 404, 409, 503),
)
async def submit_withdrawal(
    body: WithdrawalRequest, wallet: CurrentProvider, runtime: RuntimeDep, response: Response
) -> dict[str, Any]:
    message = body.message.model_dump(exclude_none=True)
    result = await _exits(runtime).submit(wallet, body.step, message, body.signature)
    if not submitted(response, result):
        _prepaid(runtime).refresh_soon(wallet)
    return result


@router.get(
    "/withdrawals/{task_id}",
    response_model=WithdrawalStatus,
    summary="A withdrawal step's status",
    responses=errors(400, 401, 404, 503),
)
async def withdrawal_status(
    task_id: Annotated[str, Path(max_length=100)], wallet: CurrentProvider, runtime: RuntimeDep
) -> dict[str, Any]:
    return await _exits(runtime).status(task_id)


# ---- periodic allowances (ERC-7715 `erc20-token-periodic`) and auto top-ups --------------------


class SignerMeta(BaseModel):
    delegationManager: str | None = None


class PermissionResponse(BaseModel):
    """A `wallet_requestExecutionPermissions` (or the older `wallet_grantPermissions`) response
    entry, or just its `context`: other fields are accepted and not needed. Or, instead of the
    context, the signed delegation of `GET /v1/account/allowances/typed-data` (what a page whose
    wallet signs typed data sends)."""

    model_config = ConfigDict(extra="ignore")

    context: str | None = Field(
        default=None, pattern=r"^0x([0-9a-fA-F]{2}){64,32768}$", description="abi.encode(Delegation[])"
    )
    delegation: SignedFrameworkDelegation | None = None
    chainId: str | int | None = None
    delegationManager: str | None = None
    signerMeta: SignerMeta | None = None

    @model_validator(mode="after")
    def _one_grant(self) -> PermissionResponse:
        if (self.context is None) == (self.delegation is None):
            raise ValueError("give the permission's context or its signed delegation (one of them)")
        return self

    def permission_context(self) -> bytes:
        if self.context is not None:
            return bytes.fromhex(self.context[2:])
        assert self.delegation is not None
        try:
            return dlg.encode_context([self.delegation.delegation()])
        except dlg.DelegationError as exc:
            raise BadRequest(str(exc), code="invalid_permission") from None


class AllowanceTypedData(BaseModel):
    typed_data: dict[str, Any]
    hash: str


class AllowanceOut(BaseModel):
    object: str = "allowance"
    hash: str
    wallet: str
    period_amount: str
    period_amount_atomic: int
    period_seconds: int
    start: int
    expiry: int | None
    available_now_atomic: int | None
    delegation: dict[str, Any] = Field(description="Its delegation's EIP-712 message (to disable it)")
    top_ups: int | None = Field(description="Top-ups made under it (None: the chain's logs are unavailable)")
    topped_up: str | None
    topped_up_atomic: int | None
    revoked: bool
    last_top_up_at: datetime | None
    last_error: str | None


class AllowanceList(BaseModel):
    object: str = "list"
    data: list[AllowanceOut]


def allowance_view(view: AllowanceView, available: int | None, top_ups: list[int] | None) -> dict[str, Any]:
    total = None if top_ups is None else sum(top_ups)
    (delegation,) = dlg.decode_context(bytes.fromhex(view.context[2:]))
    return {
        "delegation": delegation.message(),
        "top_ups": None if top_ups is None else len(top_ups),
        "topped_up": None if total is None else usdc(total),
        "topped_up_atomic": total,
        "hash": view.hash,
        "wallet": view.wallet,
        "period_amount": usdc(view.period_amount),
        "period_amount_atomic": view.period_amount,
        "period_seconds": view.period_duration,
        "start": view.start_date,
        "expiry": view.expiry,
        "available_now_atomic": available,
        "revoked": view.revoked_at is not None,
        "last_top_up_at": view.last_top_up_at,
        "last_error": view.last_error,
    }


def _allowances(runtime: Any) -> AllowanceService:
    if runtime.allowances is None:
        raise NotFound(
            "Periodic allowances need MetaMask's Delegation Framework on this chain and the operator's key",
            code="allowances_unavailable",
        )
    service: AllowanceService = runtime.allowances
    return service


@router.post(
    "/allowances",
    response_model=AllowanceOut,
    status_code=201,
    summary="Register a periodic USDC allowance (ERC-7715 permission context) for automatic top-ups",
    responses=errors(400, 401, 404, 409, 503),
)
async def register_allowance(
    body: PermissionResponse, wallet: CurrentProvider, runtime: RuntimeDep
) -> dict[str, Any]:
    service = _allowances(runtime)
    manager = body.delegationManager or (body.signerMeta.delegationManager if body.signerMeta else None)
    if manager is not None and manager.lower() != service.framework.delegation_manager.lower():
        raise BadRequest(
            f"The permission is for DelegationManager {manager}, not {service.framework.delegation_manager}",
            code="wrong_delegation_manager",
        )
    if body.chainId is not None and str(body.chainId) not in (
        str(service.escrow.chain_id),
        hex(service.escrow.chain_id),
    ):
        raise BadRequest(f"The permission is for chain {body.chainId}", code="wrong_chain")
    view = await service.register(wallet, body.permission_context())
    return allowance_view(view, *await service.state(view))


@router.get(
    "/allowances/typed-data",
    response_model=AllowanceTypedData,
    summary="A periodic USDC allowance to the relay to sign (an ERC-7715 erc20-token-periodic grant)",
    responses=errors(400, 401, 404, 503),
)
async def allowance_typed_data(
    wallet: CurrentProvider,
    runtime: RuntimeDep,
    period_amount: Annotated[Usdc, Query(description="Most the relay may take per period (USDC)")],
    period_seconds: Annotated[int, Query(ge=60, le=366 * 86_400, description="The period's length")],
    expiry: Annotated[int, Query(ge=1, lt=2**40, description="Unix time it ends")],
    start: Annotated[int | None, Query(ge=0, lt=2**40, description="Unix time periods start from")] = None,
) -> dict[str, Any]:
    amount = atomic(period_amount)
    return await _allowances(runtime).typed_data(
        wallet, period_amount=amount, period_duration=period_seconds, start=start, expiry=expiry
    )


@router.get(
    "/allowances",
    response_model=AllowanceList,
    summary="Your periodic allowances",
    responses=errors(401, 404, 503),
)
async def list_allowances(wallet: CurrentProvider, runtime: RuntimeDep) -> dict[str, Any]:
    rows = await _allowances(runtime).of_wallet(wallet)
    data = [allowance_view(r["allowance"], r["available"], r["top_ups"]) for r in rows]
    return {"object": "list", "data": data}
