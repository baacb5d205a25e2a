"""`GET /v1/settlements/{id}`: what happened to a payment after the call (x402: `x402_<n>`, as
named by the `PAYMENT-RESPONSE` header and a paid stream's last event) or a settlement batch
(`batch_<n>`). Public, like the chain it mirrors: amounts, payer and transaction are on-chain."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel

from quotra.api.deps import RuntimeDep
from quotra.errors import NotFound, ServiceUnavailable

router = APIRouter(prefix="/v1/settlements", tags=["payments"])

# x402 row status → what a client needs to know
_X402_STATE = {
    "reserved": "pending",
    "captured": "pending",
    "settling": "submitted",
    "reconciling": "submitted",
    "settled": "settled",
    "reconciled": "settled",
    "refunded": "refunded",
    "voided": "voided",
    "failed": "failed",
}


class Settlement(BaseModel):
    id: str
    object: Literal["quotra.settlement"] = "quotra.settlement"
    kind: Literal["x402", "batch"]
    status: str  # pending | submitted | settled | refunded | voided | failed (x402); batch status
    detail: str
    amount: str
    network: str | None = None
    payer: str | None = None
    provider: str | None = None
    listing: str | None = None
    transaction: str | None = None
    batch: str | None = None
    items: int | None = None
    error: str | None = None
    created_at: datetime
    updated_at: datetime


@router.get("/{settlement_id}", response_model=Settlement, summary="Status of a payment's settlement")
async def get_settlement(
    runtime: RuntimeDep, settlement_id: str = Path(pattern=r"^(x402|batch)_[0-9]{1,18}$")
) -> dict[str, Any]:
    payments = runtime.payments
    if payments is None:
        raise ServiceUnavailable("Payments are not configured on this relay", code="payments_unavailable")
    kind, _, number = settlement_id.partition("_")
    network = payments.gate.terms.network if payments.gate.terms is not None else None
    if kind == "x402":
        row = await payments.repo.get_x402(int(number))
        if row is None:
            raise NotFound(f"No settlement '{settlement_id}'", code="settlement_not_found")
        return {
            "id": settlement_id,
            "kind": "x402",
            "status": _X402_STATE.get(row.status, row.status),
            "detail": row.status,
            "amount": str(row.amount),
            "network": network,
            "payer": row.payer,
            "provider": row.provider,
            "listing": row.listing_id,
            "transaction": row.tx_hash,
            "batch": f"batch_{row.batch_id}" if row.batch_id is not None else None,
            "error": row.error,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
        }
    batch = await payments.repo.get_batch(int(number))
    if batch is None:
        raise NotFound(f"No settlement '{settlement_id}'", code="settlement_not_found")
    return {
        "id": settlement_id,
        "kind": "batch",
        "status": batch.status,
        "detail": batch.kind,
        "amount": str(batch.amount),
        "network": network,
        "transaction": batch.tx_hash,
        "items": batch.items,
        "error": batch.error,
        "created_at": batch.created_at,
        "updated_at": batch.updated_at,
    }
