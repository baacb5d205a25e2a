"""`GET /v1/calls/{id}`: what happened to a call and what it was charged, for its payer.

Every answer of `POST /v1/chat/completions` names its call (`Quotra-Call-Id`, and an x402 payment's
`PAYMENT-RESPONSE`), so a client whose connection dropped can learn the outcome. Asked with the
payer's sign-in session or one of its API keys, or — for an x402 call — with the same
`PAYMENT-SIGNATURE` (or `X-PAYMENT`) that paid for it: holding the payer's signed authorization is
the proof. An app's calls are also its developer's to ask about (an end user paying with its own
wallet is their payer). Anyone else is told the call does not exist.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from quotra.api.deps import RuntimeDep, bearer_wallet
from quotra.api.routing import BoundedRoute, errors
from quotra.calls.records import CALL_ID_PATTERN, CallView, payer_ids, summary
from quotra.errors import NotFound

router = APIRouter(prefix="/v1/calls", tags=["calls"], route_class=BoundedRoute)


class CallUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class CallOutcome(BaseModel):
    id: str
    object: str = "quotra.call"
    gate: str
    state: str
    charged: bool
    amount: str
    amount_atomic: int = Field(
        description="What the call was charged: what it used, at most what was reserved"
    )
    returned_to_deposit_atomic: int = Field(
        description="x402: the rest of the payer's authorization (`reserved_atomic` less the charge), "
        "which the escrow credits to the payer's deposit when it settles the payment"
    )
    markup_atomic: int = Field(description="The app developer's part of the amount")
    app: str | None
    end_user: str | None
    reserved_atomic: int = Field(description="What was reserved for the call (x402: the amount authorized)")
    fee_atomic: int | None
    listing: str
    provider: str
    model: str
    stream: bool
    usage: CallUsage
    outcome: str | None
    error: str | None
    transaction: str | None
    created_at: str
    updated_at: str


async def _is_payer(request: Request, runtime: Any, call: CallView) -> bool:
    """The call's payer, or the developer of the app it was made by (an end user paying with its
    own wallet is the payer of its app's calls)."""
    wallet = await bearer_wallet(request, runtime)
    if wallet is not None and call.payer in payer_ids(wallet):
        return True
    if wallet is not None and call.app_id is not None:
        app = await runtime.apps.repo.get_app(call.app_id)
        if app is not None and app.owner == wallet:
            return True
    if call.gate == "x402" and runtime.payments is not None:
        auth = runtime.payments.gate.payer_of(request.headers)
        if auth is not None:
            paid = await runtime.calls.by_authorization(auth.payer, auth.nonce_hex.lower())
            return paid is not None and paid.id == call.id
    return False


@router.get(
    "/{call_id}",
    response_model=CallOutcome,
    summary="What happened to a call, for its payer or its app's developer",
    responses=errors(400, 401, 404),
)
async def get_call(
    request: Request,
    runtime: RuntimeDep,
    call_id: Annotated[str, Path(pattern=CALL_ID_PATTERN)],
) -> dict[str, Any]:
    call = await runtime.calls.get(call_id)
    if call is None or not await _is_payer(request, runtime, call):
        raise NotFound(f"No call '{call_id}' of yours", code="call_not_found")
    return summary(call)
