"""ETH-free claims for providers, their earnings, and gasless revocations; for MetaMask smart
accounts also claims by ERC-7710 delegations and revocation by the framework's `disableDelegation`.

Amounts are USDC as decimal strings (`"1.50"`) with their atomic value beside them; the EIP-712
messages to sign carry atomic integers (as decimal strings, safe for JavaScript).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from eth_utils import to_checksum_address
from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from quotra.api.deps import CurrentProvider, RuntimeDep
from quotra.api.routing import BoundedRoute, errors
from quotra.bounds import Address, Offset, PageSize, Uint256
from quotra.chain import delegation as dlg
from quotra.chain.client import DelegationArgs
from quotra.errors import BadRequest, NotFound
from quotra.payments.claims import ClaimService
from quotra.store.claims_repo import CLAIM_ID_PATTERN, REVOCATION_ID_PATTERN, ClaimView, RevocationView

router = APIRouter(tags=["claims"], route_class=BoundedRoute)

ATOMIC = Decimal(10**6)
SignatureStr = Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{130}$", description="65-byte signature, 0x-hex")]
Bytes32Str = Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{64}$")]
HexBytesStr = Annotated[str, Field(pattern=r"^0x([0-9a-fA-F]{2}){1,2048}$")]
UsdcAmount = Annotated[Decimal, Field(gt=0, le=Decimal(10**12), decimal_places=6, description="USDC")]


def usdc_text(atomic: int) -> str:
    whole, frac = divmod(atomic, 10**6)
    return f"{whole}.{frac:06d}"


def to_atomic(amount: Decimal) -> int:
    return int(amount * ATOMIC)


class ClaimsUnavailable(NotFound):
    """This relay offers no claims (no chain or no relayer configured): like a missing route."""

    code = "claims_unavailable"


async def claims_service(runtime: RuntimeDep) -> ClaimService:
    if runtime.claims is None:
        raise ClaimsUnavailable(
            "Claims need the chain and a relayer: set QUOTRA_CHAIN_RPC_URL, QUOTRA_DEPLOYMENT_FILE and "
            "QUOTRA_RELAYER (with QUOTRA_OPERATOR_KEY for direct, QUOTRA_RELAYER_URL for oneshot)",
            code="claims_unavailable",
        )
    return runtime.claims


ClaimsDep = Annotated[ClaimService, Depends(claims_service)]


# ---- models ------------------------------------------------------------------------------------


class DelegationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: Address
    delegate: Address
    payee: Address
    max_amount: Uint256
    relayer_fee: Uint256
    valid_until: Uint256
    salt: Uint256

    def args(self) -> DelegationArgs:
        return DelegationArgs(
            provider=to_checksum_address(self.provider),
            delegate=to_checksum_address(self.delegate),
            payee=to_checksum_address(self.payee),
            max_amount=self.max_amount,
            relayer_fee=self.relayer_fee,
            valid_until=self.valid_until,
            salt=self.salt,
        )


class ClaimRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delegation: DelegationIn
    signature: SignatureStr
    amount: UsdcAmount | None = Field(default=None, description="Defaults to the delegation's max_amount")


class ClaimOut(BaseModel):
    id: str
    object: str = "claim"
    kind: str
    status: str
    provider: str
    payee: str
    amount: str
    amount_atomic: int
    relayer_fee: str
    relayer_fee_atomic: int
    delegation_digest: str
    relayer: str
    task_id: str | None
    tx_hash: str | None
    block_number: int | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    delegation_revoked: bool | None = Field(
        default=None, description="Whether its delegation was revoked or disabled (in lists only)"
    )


class ClaimList(BaseModel):
    object: str = "list"
    data: list[ClaimOut]


class RelayerQuoteOut(BaseModel):
    relayer: str
    address: str
    fee: str
    fee_atomic: int
    quote_expires_at: int | None


class TypedDataOut(BaseModel):
    typed_data: dict[str, Any]
    digest: str
    amount: str
    amount_atomic: int
    claimable: str
    relayer: RelayerQuoteOut


class FrameworkCaveatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enforcer: Address
    terms: Annotated[str, Field(pattern=r"^0x([0-9a-fA-F]{2}){0,4096}$")]


class FrameworkDelegationIn(BaseModel):
    """A Delegation Framework `Delegation` as its EIP-712 message (what the wallet signed)."""

    model_config = ConfigDict(extra="forbid")

    delegate: Address
    delegator: Address
    authority: Bytes32Str = "0x" + "f" * 64
    caveats: list[FrameworkCaveatIn] = Field(max_length=16)
    salt: Uint256

    def delegation(self, signature: str = "0x") -> dlg.Delegation:
        message = self.model_dump()
        message["salt"] = str(self.salt)
        return dlg.Delegation.from_message(message, bytes.fromhex(signature[2:]))


class SignedFrameworkDelegation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: FrameworkDelegationIn
    signature: HexBytesStr = Field(description="The delegator's signature of the EIP-712 typed data")

    def delegation(self) -> dlg.Delegation:
        return self.message.delegation(self.signature)


class AuthorizationIn(BaseModel):
    """A signed EIP-7702 authorization (eth-account / viem `signAuthorization` fields)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    chain_id: Uint256 = Field(alias="chainId")
    address: Address
    nonce: Uint256
    y_parity: Annotated[int, Field(ge=0, le=1)] = Field(alias="yParity")
    r: Uint256
    s: Uint256

    def authorization(self) -> dlg.SetCodeAuthorization:
        return dlg.SetCodeAuthorization(
            self.chain_id, to_checksum_address(self.address), self.nonce, self.y_parity, self.r, self.s
        )


class RedemptionClaimRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    claim: SignedFrameworkDelegation
    fee: SignedFrameworkDelegation | None = None
    amount: UsdcAmount | None = Field(default=None, description="Defaults to the delegation's cap")
    authorization: AuthorizationIn | None = Field(
        default=None, description="The EIP-7702 upgrade to MetaMask's stateless DeleGator, if not done yet"
    )


class UpgradeOut(BaseModel):
    chainId: int
    address: str
    nonce: int


class RedemptionTypedDataOut(BaseModel):
    claim: dict[str, Any]
    fee: dict[str, Any] | None
    authorization: UpgradeOut | None
    amount: str
    amount_atomic: int
    claimable: str
    relayer: RelayerQuoteOut


class DisableTypedDataRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delegation: FrameworkDelegationIn


class DisableTypedDataOut(BaseModel):
    typed_data: dict[str, Any]
    hash: str


class ClaimDisableOut(DisableTypedDataOut):
    delegation: dict[str, Any] = Field(description="The claim's delegation (its EIP-712 message) to disable")


class AccountKindOut(BaseModel):
    address: str
    kind: str = Field(description="metamask_eip7702, eoa or contract")
    erc7710: bool = Field(description="Whether its Delegation Framework delegations can be redeemed")
    stateless_delegator: str | None
    delegation_manager: str | None


class DisableRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delegation: FrameworkDelegationIn = Field(description="The delegation to disable")
    grant: SignedFrameworkDelegation = Field(description="The signed one-use disableDelegation grant")


class EarningsOut(BaseModel):
    provider: str
    claimable: str
    claimable_atomic: int
    claimed: str
    claimed_atomic: int
    claimed_via_relay_atomic: int
    pending_atomic: int
    per_listing: dict[str, str] | None


class RevocationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account: Address
    item: Bytes32Str = Field(description="EIP-712 digest of the delegation or spend permission")
    signature: SignatureStr = Field(
        description="The account's EIP-712 signature of Revocation(account, item)"
    )


class RevocationOut(BaseModel):
    id: str
    object: str = "revocation"
    status: str
    account: str
    item: str
    kind: str
    relayer: str
    task_id: str | None
    tx_hash: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime


def claim_out(claim: ClaimView) -> dict[str, Any]:
    return {
        "id": claim.id,
        "kind": claim.kind,
        "status": claim.status,
        "provider": claim.provider,
        "payee": claim.payee,
        "amount": usdc_text(claim.amount),
        "amount_atomic": claim.amount,
        "relayer_fee": usdc_text(claim.relayer_fee),
        "relayer_fee_atomic": claim.relayer_fee,
        "delegation_digest": claim.delegation_digest,
        "relayer": claim.relayer,
        "task_id": claim.task_id,
        "tx_hash": claim.tx_hash,
        "block_number": claim.block_number,
        "error": claim.error,
        "created_at": claim.created_at,
        "updated_at": claim.updated_at,
    }


def revocation_out(revocation: RevocationView) -> dict[str, Any]:
    fields = ("id", "status", "account", "item", "kind", "relayer", "task_id", "tx_hash", "error")
    out = {name: getattr(revocation, name) for name in fields}
    out.update(created_at=revocation.created_at, updated_at=revocation.updated_at)
    return out


# ---- claims ------------------------------------------------------------------------------------


@router.get(
    "/v1/provider/claims/typed-data",
    response_model=TypedDataOut,
    summary="A Delegation to sign for one claim, with the relayer's current fee",
    responses=errors(400, 401, 404, 409, 503),
)
async def claim_typed_data(
    provider: CurrentProvider,
    claims: ClaimsDep,
    amount: Annotated[UsdcAmount, Field(description="USDC to claim, relayer fee included")],
    payee: Address | None = None,
) -> dict[str, Any]:
    result = await claims.typed_data(provider, to_atomic(amount), payee)
    typed = result["typed_data"]
    typed["message"] = {k: str(v) if isinstance(v, int) else v for k, v in typed["message"].items()}
    return {"typed_data": typed, "digest": result["digest"], **_offer(amount, result)}


def _offer(amount: Decimal, result: dict[str, Any]) -> dict[str, Any]:
    quote = result["quote"]
    return {
        "amount": usdc_text(to_atomic(amount)),
        "amount_atomic": to_atomic(amount),
        "claimable": usdc_text(result["earnings"]),
        "relayer": {
            "relayer": quote.relayer,
            "address": quote.delegate,
            "fee": usdc_text(quote.fee),
            "fee_atomic": quote.fee,
            "quote_expires_at": quote.expires_at,
        },
    }


@router.post(
    "/v1/provider/claims",
    response_model=ClaimOut,
    status_code=202,
    summary="Claim earnings without ETH: a signed Delegation, submitted by the relayer",
    responses=errors(400, 401, 403, 404, 409, 503),
)
async def create_claim(body: ClaimRequest, provider: CurrentProvider, claims: ClaimsDep) -> dict[str, Any]:
    delegation = body.delegation.args()
    amount = to_atomic(body.amount) if body.amount is not None else delegation.max_amount
    return claim_out(await claims.submit(provider, delegation, body.signature, amount))


@router.get(
    "/v1/provider/claims/erc7710/typed-data",
    response_model=RedemptionTypedDataOut,
    summary="ERC-7710 Delegations (MetaMask's Delegation Framework) to sign for one claim and its fee",
    responses=errors(400, 401, 404, 409, 503),
)
async def redemption_typed_data(
    provider: CurrentProvider,
    claims: ClaimsDep,
    amount: Annotated[UsdcAmount, Field(description="USDC to claim, relayer fee included")],
    payee: Address | None = None,
) -> dict[str, Any]:
    result = await claims.redemption_typed_data(provider, to_atomic(amount), payee)
    return {
        "claim": result["claim"],
        "fee": result["fee"],
        "authorization": result["authorization"],
        **_offer(amount, result),
    }


@router.post(
    "/v1/provider/claims/erc7710",
    response_model=ClaimOut,
    status_code=202,
    summary="Claim earnings from a smart account without ETH: ERC-7710 delegations the relayer redeems",
    responses=errors(400, 401, 403, 404, 409, 503),
)
async def create_redemption_claim(
    body: RedemptionClaimRequest, provider: CurrentProvider, claims: ClaimsDep
) -> dict[str, Any]:
    try:
        claim = body.claim.delegation()
        fee = body.fee.delegation() if body.fee is not None else None
    except dlg.DelegationError as exc:
        raise BadRequest(str(exc), code="invalid_delegation") from None
    amount = to_atomic(body.amount) if body.amount is not None else None
    authorization = body.authorization.authorization() if body.authorization is not None else None
    return claim_out(await claims.submit_redemption(provider, claim, fee, amount, authorization))


@router.get(
    "/v1/provider/claims",
    response_model=ClaimList,
    summary="The signed-in provider's claims",
    responses=errors(400, 401),
)
async def list_claims(
    provider: CurrentProvider, runtime: RuntimeDep, limit: PageSize = 50, offset: Offset = 0
) -> dict[str, Any]:
    repo = runtime.claims_repo
    rows = await repo.list_claims(to_checksum_address(provider), limit=limit, offset=offset)
    revoked = await repo.revoked_digests([c.delegation_digest for c in rows])
    data = [{**claim_out(c), "delegation_revoked": c.delegation_digest in revoked} for c in rows]
    return {"object": "list", "data": data}


@router.get(
    "/v1/provider/claims/{claim_id}/disable/typed-data",
    response_model=ClaimDisableOut,
    summary="The grant to sign so the relayer disables an ERC-7710 claim's delegation for free",
    responses=errors(400, 401, 404, 503),
)
async def claim_disable_typed_data(
    provider: CurrentProvider, claims: ClaimsDep, claim_id: Annotated[str, Path(pattern=CLAIM_ID_PATTERN)]
) -> dict[str, Any]:
    # The relayer the claim was given to redeems the grant (no quote needed: it may be down).
    target = await claims.claim_delegation(provider, claim_id)
    return {**await claims.disable_typed_data(target, target.delegate), "delegation": target.message()}


@router.get(
    "/v1/provider/claims/{claim_id}",
    response_model=ClaimOut,
    summary="One claim",
    responses=errors(400, 401, 404),
)
async def get_claim(
    provider: CurrentProvider, runtime: RuntimeDep, claim_id: Annotated[str, Path(pattern=CLAIM_ID_PATTERN)]
) -> dict[str, Any]:
    claim = await runtime.claims_repo.get_claim(claim_id)
    if claim is None or claim.provider != to_checksum_address(provider):
        raise NotFound(f"No claim {claim_id}")
    return claim_out(claim)


@router.get(
    "/v1/provider/earnings",
    response_model=EarningsOut,
    summary="Claimable on-chain, claimed, and earned per listing (from the ledger)",
    responses=errors(401, 404, 503),
)
async def earnings(provider: CurrentProvider, claims: ClaimsDep) -> dict[str, Any]:
    result = await claims.earnings(provider)
    per_listing = result["per_listing"]
    return {
        "provider": to_checksum_address(provider),
        "claimable": usdc_text(result["claimable"]),
        "claimable_atomic": result["claimable"],
        "claimed": usdc_text(result["claimed"]),
        "claimed_atomic": result["claimed"],
        "claimed_via_relay_atomic": result["claimed_via_relay"],
        "pending_atomic": result["pending"],
        "per_listing": {k: usdc_text(v) for k, v in per_listing.items()} if per_listing else None,
    }


@router.get(
    "/v1/account/smart-account",
    response_model=AccountKindOut,
    summary="Whether the signed-in account is a MetaMask smart account (EIP-7702), for ERC-7710",
    responses=errors(401, 404, 503),
)
async def account_kind(account: CurrentProvider, claims: ClaimsDep) -> dict[str, Any]:
    return await claims.account_kind(account)


# ---- revocations -------------------------------------------------------------------------------


@router.post(
    "/v1/revocations",
    response_model=RevocationOut,
    status_code=202,
    summary="Revoke a delegation or spend permission without ETH (a signed Revocation)",
    responses=errors(400, 404, 503),
)
async def create_revocation(body: RevocationRequest, claims: ClaimsDep) -> dict[str, Any]:
    # The signature is the authority: no session is needed to revoke one's own grant.
    item = bytes.fromhex(body.item[2:])
    return revocation_out(await claims.revoke(to_checksum_address(body.account), item, body.signature))


@router.get(
    "/v1/revocations/{revocation_id}",
    response_model=RevocationOut,
    summary="One revocation",
    responses=errors(400, 404),
)
async def get_revocation(
    runtime: RuntimeDep, revocation_id: Annotated[str, Path(pattern=REVOCATION_ID_PATTERN)]
) -> dict[str, Any]:
    revocation = await runtime.claims_repo.get_revocation(revocation_id)
    if revocation is None:
        raise NotFound(f"No revocation {revocation_id}")
    return revocation_out(revocation)


@router.post(
    "/v1/delegations/disable/typed-data",
    response_model=DisableTypedDataOut,
    summary="The one-use grant to sign so the relayer disables a framework delegation for free",
    responses=errors(400, 404, 503),
)
async def disable_typed_data(body: DisableTypedDataRequest, claims: ClaimsDep) -> dict[str, Any]:
    try:
        target = body.delegation.delegation()
    except dlg.DelegationError as exc:
        raise BadRequest(str(exc), code="invalid_delegation") from None
    return await claims.disable_typed_data(target)


@router.post(
    "/v1/delegations/disable",
    response_model=RevocationOut,
    status_code=202,
    summary="Disable an ERC-7710 delegation (DelegationManager.disableDelegation) without ETH",
    responses=errors(400, 404, 503),
)
async def disable_delegation(body: DisableRequest, claims: ClaimsDep) -> dict[str, Any]:
    # The delegator's signature of the grant is the authority, as for /v1/revocations.
    try:
        target, grant = body.delegation.delegation(), body.grant.delegation()
    except dlg.DelegationError as exc:
        raise BadRequest(str(exc), code="invalid_delegation") from None
    return revocation_out(await claims.disable(target, grant))
