"""Sign-In with Ethereum: a server-issued single-use nonce, then a signed EIP-4361 message,
exchanged for a short-lived session token (`Authorization: Bearer qs_…`). The marketplace pages
ask (with the `Quotra-Web` header) for the same token in an HttpOnly, SameSite=Strict cookie
instead, which script on the page can never read."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from eth_utils import to_checksum_address
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from quotra.api.deps import SESSION_COOKIE, WEB_HEADER, CurrentProvider, Runtime, RuntimeDep, client_ip
from quotra.api.routing import BoundedRoute, errors
from quotra.errors import AuthenticationFailed
from quotra.siwe import SiweError, SiweMessage, format_time
from quotra.store.rate_limits import take

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
    access_token: str | None = Field(
        description="The bearer token; null when it was set as the pages' HttpOnly cookie instead"
    )
    token_type: str = "bearer"  # noqa: S105 - the OAuth token type, not a secret
    address: str
    expires_at: int


class WhoAmI(BaseModel):
    address: str


async def _limit(runtime: Runtime, key: str, per_minute: int, what: str) -> None:
    """Sign-in is limited per client address (nonces and verifications) and per wallet (verified
    sign-ins), in the database: every replica takes from the same limit."""
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    decision = await runtime.calls.transactions.run(take, key, per_minute, now_us)
    if not decision.allowed:
        raise decision.refusal(what)


async def _limit_client(runtime: Runtime, request: Request) -> None:
    ip = client_ip(request, runtime.settings)
    await _limit(
        runtime, f"signin:ip:{ip}", runtime.settings.signin_rate_per_minute_ip, "sign-in from this address"
    )


async def _limit_wallet(runtime: Runtime, address: str) -> None:
    await _limit(
        runtime, f"signin:wallet:{address}", runtime.settings.signin_rate_per_minute, "sign-in of this wallet"
    )


@router.post(
    "/nonce",
    response_model=NonceResponse,
    status_code=201,
    summary="Get a single-use SIWE nonce",
    responses=errors(400, 429),
)
async def nonce(request: Request, runtime: RuntimeDep, body: NonceRequest | None = None) -> dict[str, Any]:
    await _limit_client(runtime, request)
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
    responses=errors(400, 401, 429),
)
async def verify(
    body: VerifyRequest, runtime: RuntimeDep, request: Request, response: Response
) -> dict[str, Any]:
    await _limit_client(runtime, request)
    try:
        message = await runtime.siwe.verify(body.message, body.signature)
    except SiweError as exc:
        raise AuthenticationFailed(f"Sign-in refused: {exc}", code="invalid_siwe") from exc
    await _limit_wallet(runtime, message.address)
    if not await runtime.store.consume_nonce(message.nonce):
        raise AuthenticationFailed(
            "Sign-in refused: unknown, expired or already used nonce", code="invalid_nonce"
        )
    token, expires = runtime.sessions.issue(message.address)
    access_token: str | None = token
    runtime.prepaid.refresh_soon(message.address)  # the prepaid account mirror, in the background
    if WEB_HEADER in request.headers:
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=runtime.sessions.ttl,
            path="/",
            secure=runtime.settings.public_url.startswith("https://"),
            httponly=True,
            samesite="strict",
        )
        access_token = None  # script on the page never sees it
    return {
        "access_token": access_token,
        "token_type": "bearer",
        "address": message.address,
        "expires_at": expires,
    }


@router.get("/session", response_model=WhoAmI, summary="The signed-in wallet", responses=errors(401))
async def session(address: CurrentProvider) -> dict[str, str]:
    return {"address": address}


@router.post("/logout", status_code=204, summary="End the pages' cookie session")
async def logout(runtime: RuntimeDep) -> Response:
    response = Response(status_code=204)
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        secure=runtime.settings.public_url.startswith("https://"),
        httponly=True,
        samesite="strict",
    )
    return response
