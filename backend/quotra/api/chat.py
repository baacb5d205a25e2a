"""`POST /v1/chat/completions`: OpenAI's request and response shapes, streaming as SSE. An app's
key may name the end user a call is for, with `X-Quotra-User` or as
`POST /v1/users/{id}/chat/completions`."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Body, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from quotra.api.apps import USER_ID_PATTERN
from quotra.api.deps import CurrentCaller, RuntimeDep
from quotra.api.routing import BoundedRoute, errors
from quotra.bounds import ModelRef, TokenCount
from quotra.errors import BadRequest
from quotra.payments.x402_gate import X402Attempt
from quotra.services.gate import Caller

END_USER_HEADER = "x-quotra-user"

router = APIRouter(tags=["openai"], route_class=BoundedRoute)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    """The OpenAI request; fields the relay does not inspect are passed on to the upstream."""

    model_config = ConfigDict(extra="allow")

    model: ModelRef
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=1)
    stop: str | list[str] | None = None
    user: str | None = None


class ChatCompletion(BaseModel):
    """`chat.completion` (streaming answers are `text/event-stream` of `chat.completion.chunk`)."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class DisconnectAwareStream(StreamingResponse):
    """Always watches for the client going away (whatever the ASGI version), and then cancels
    the body iterator, which closes the upstream request."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def run(func: Callable[[], Awaitable[None]]) -> None:
                await func()
                group.cancel_scope.cancel()

            group.start_soon(run, lambda: self.stream_response(send))
            await run(lambda: self.listen_for_disconnect(receive))


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {"content": {"text/event-stream": {}}},
        **errors(400, 401, 402, 404, 409, 429, 502, 503),
    },
    summary="Create a chat completion (OpenAI-compatible)",
)
async def chat_completions(
    payload: Annotated[ChatCompletionRequest, Body()],
    caller: CurrentCaller,
    runtime: RuntimeDep,
    http_request: Request,
) -> Any:
    caller = for_end_user(caller, http_request.headers.get(END_USER_HEADER))
    return await _complete(payload, caller, runtime, http_request)


@router.post(
    "/v1/users/{user_id}/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {"content": {"text/event-stream": {}}},
        **errors(400, 401, 402, 404, 409, 429, 502, 503),
    },
    summary="Create a chat completion for one of your app's end users (OpenAI-compatible)",
)
async def user_chat_completions(
    user_id: Annotated[str, Path(max_length=128, description="The end user's id in your app")],
    payload: Annotated[ChatCompletionRequest, Body()],
    caller: CurrentCaller,
    runtime: RuntimeDep,
    http_request: Request,
) -> Any:
    header = http_request.headers.get(END_USER_HEADER)
    if header is not None and header != user_id:
        raise BadRequest("X-Quotra-User names another end user than the path", param="X-Quotra-User")
    return await _complete(payload, for_end_user(caller, user_id), runtime, http_request)


def for_end_user(caller: Caller, end_user: str | None) -> Caller:
    """The caller, making its call for `end_user` (an app key's end user, checked)."""
    if end_user is None:
        return caller
    if not re.fullmatch(USER_ID_PATTERN, end_user):
        raise BadRequest(
            "An end user id is 1 to 128 letters, digits and ._:@+=- (starting with a letter or digit)",
            param="X-Quotra-User",
            code="invalid_end_user",
        )
    if caller.api_key is None or caller.api_key.app_id is None:
        raise BadRequest(
            "End users belong to an app: call with one of your app's keys (POST /v1/apps/{app_id}/keys)",
            param="X-Quotra-User",
            code="end_user_needs_app_key",
        )
    return dataclasses.replace(caller, end_user=end_user)


async def _complete(
    payload: ChatCompletionRequest, caller: Caller, runtime: Any, http_request: Request
) -> Any:
    request = payload.model_dump(exclude_none=True, exclude_unset=False)
    # An x402 payment (PAYMENT-SIGNATURE / X-PAYMENT) is checked per listing by the gate; the body
    # was read already (its hash goes into the signed receipt).
    attempt = X402Attempt.from_request(http_request.headers, await http_request.body())
    if attempt is not None:
        caller = dataclasses.replace(caller, payment=attempt)
    if payload.stream:
        body, headers = await runtime.relay.open_stream(caller, request)
        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return DisconnectAwareStream(body, media_type="text/event-stream", headers=headers)
    completion, headers = await runtime.relay.complete(caller, request)
    return JSONResponse(completion, headers=headers)
