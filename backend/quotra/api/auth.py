"""Sign-In with Ethereum: a server-issued single-use nonce, then a signed EIP-4361 message,
exchanged for a short-lived session token (`Authorization: Bearer qs_…`)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from eth_utils import to_checksum_address
from fastapi import APIRouter
from pydantic import BaseModel, Field

from quotra.api.deps import CurrentProvider, RuntimeDep
from quotra.api.routing import BoundedRoute, errors
from quotra.errors import AuthenticationFailed
from quotra.siwe import SiweError, SiweMessage, format_time

router = APIRouter(prefix="/v1/auth", tags=["auth"], route_class=BoundedRoute)
STATEMENT = "Sign in to Quotra."


class NonceRequest(BaseModel):
    address: str | None = Field(
        default=None,
        pattern=r"^0x[0-9a-fA-F]{40}$",
        description="If given, a ready-to-sign message is returned",
    )


class NonceResponse(BaseModel):
    nonce: str
    domain: str
    uri: str
    chain_id: int
    statement: str
    issued_at: str
    expiration_time: str
    message: str | None = None


class VerifyRequest(BaseModel):
    message: str = Field(min_length=1, max_length=8192)
    signature: str = Field(min_length=2, max_length=8192, pattern=r"^0x[0-9a-fA-F]*$")


class SessionResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"  # noqa: S105 - the OAuth token type, not a secret
    address: str
    expires_at: int


class WhoAmI(BaseModel):
    address: str


@router.post(
    "/nonce",
    response_model=NonceResponse,
    status_code=201,
    summary="Get a single-use SIWE nonce",
    responses=errors(400),
)
async def nonce(runtime: RuntimeDep, body: NonceRequest | None = None) -> dict[str, Any]:
    settings = runtime.settings
    value = secrets.token_hex(16)
    now = datetime.now(UTC).replace(microsecond=0)
    expires = now + timedelta(seconds=settings.siwe_nonce_ttl_seconds)
    await runtime.store.create_nonce(value, expires)
    reply: dict[str, Any] = {
        "nonce": value,
        "domain": runtime.siwe.domain,
        "uri": runtime.siwe.uri,
        "chain_id": runtime.siwe.chain_id,
        "statement": STATEMENT,
        "issued_at": format_time(now),
        "expiration_time": format_time(expires),
    }
    if body is not None and body.address is not None:
        reply["message"] = SiweMessage(
            domain=runtime.siwe.domain,
            address=to_checksum_address(body.address),
            statement=STATEMENT,
            uri=runtime.siwe.uri,
            chain_id=runtime.siwe.chain_id,
            nonce=value,
            issued_at=reply["issued_at"],
            expiration_time=reply["expiration_time"],
        ).to_text()
    return reply


@router.post(
    "/verify",
    response_model=SessionResponse,
    summary="Exchange a signed SIWE message for a session",
    responses=errors(400, 401),
)
async def verify(body: VerifyRequest, runtime: RuntimeDep) -> dict[str, Any]:
    try:
        message = await runtime.siwe.verify(body.message, body.signature)
    except SiweError as exc:
        raise AuthenticationFailed(f"Sign-in refused: {exc}", code="invalid_siwe") from exc
    if not await runtime.store.consume_nonce(message.nonce):
        raise AuthenticationFailed(
            "Sign-in refused: unknown, expired or already used nonce", code="invalid_nonce"
        )
    token, expires = runtime.sessions.issue(message.address)
    runtime.prepaid.refresh_soon(message.address)  # the prepaid account mirror, in the background
    return {"access_token": token, "token_type": "bearer", "address": message.address, "expires_at": expires}


@router.get("/session", response_model=WhoAmI, summary="The signed-in wallet", responses=errors(401))
async def session(address: CurrentProvider) -> dict[str, str]:
    return {"address": address}
