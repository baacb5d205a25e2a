"""`GET /v1/calls/{id}`: what happened to a call and what it was charged, for its payer.

Every answer of `POST /v1/chat/completions` names its call (`Quotra-Call-Id`, and an x402 payment's
`PAYMENT-RESPONSE`), so a client whose connection dropped can learn the outcome. Asked with the
payer's sign-in session or one of its API keys, or — for an x402 call — with the same
`PAYMENT-SIGNATURE` (or `X-PAYMENT`) that paid for it: holding the payer's signed authorization is
the proof. Anyone else is told the call does not exist.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel

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
    amount_atomic: int
    reserved_atomic: int
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
    wallet = await bearer_wallet(request, runtime)
    if wallet is not None and call.payer in payer_ids(wallet):
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
    summary="What happened to a call, for its payer",
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
