"""`POST /v1/webhooks/relayer`: the gas relayer's signed status webhooks (1Shot or Standard Webhooks).

Nothing is believed before the signature, key and timestamp check out (401/400 otherwise, with
nothing changed); a verified event is recorded and applied in one transaction, so a replay is
acknowledged with 200 and no effect. The answer is immediate: applying an event is one update.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from quotra.api.deps import RuntimeDep
from quotra.api.routing import BoundedRoute, errors
from quotra.chain.oneshot import submission_from_status
from quotra.chain.relayer import RelayerError
from quotra.errors import NotFound, ServiceUnavailable, error_body
from quotra.webhooks import JwksUnavailable, WebhookRejected

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], route_class=BoundedRoute)


_BODY = (
    "A 1Shot status event ({signature, keyId, apiVersion, timestamp, type, data}), or with a "
    "webhook-signature header a Standard Webhooks event ({type, timestamp, data})"
)


class WebhookAck(BaseModel):
    received: bool
    duplicate: bool
    event_id: str
    type: int


def _refusal(status: int, code: str, message: str) -> JSONResponse:
    type_ = "authentication_error" if status == 401 else "invalid_request_error"
    return JSONResponse(error_body(status, message, type_=type_, code=code), status_code=status)


@router.post(
    "/relayer",
    response_model=WebhookAck,
    responses=errors(400, 401, 404, 503),
    summary="Relayer status webhook (Ed25519-signed)",
    # Read raw (the signature covers the bytes), so FastAPI cannot say what it takes.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "description": _BODY}}},
        }
    },
)
async def relayer_webhook(request: Request, runtime: RuntimeDep) -> JSONResponse:
    verifier = runtime.webhook_verifier
    if verifier is None:  # no relayer keys configured: as if the route did not exist
        raise NotFound(
            "Relayer webhooks are not configured (set QUOTRA_RELAYER_JWKS_URL or QUOTRA_RELAYER_PINNED_JWKS)",
            code="webhooks_unavailable",
        )
    body = await request.body()
    try:
        event = await verifier.verify(request.headers, body)
    except WebhookRejected as exc:
        return _refusal(exc.status, exc.code, exc.message)
    except JwksUnavailable as exc:
        raise ServiceUnavailable(str(exc), code="relayer_keys_unavailable") from exc
    try:
        submission = submission_from_status(event.data)
    except RelayerError as exc:
        return _refusal(400, "malformed_webhook", str(exc))
    applied = await runtime.claims_repo.record_event(event, submission)
    ack = WebhookAck(received=True, duplicate=not applied, event_id=event.event_id, type=event.type)
    return JSONResponse(ack.model_dump())
