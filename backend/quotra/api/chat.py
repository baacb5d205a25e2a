"""`POST /v1/chat/completions`: OpenAI's request and response shapes, streaming as SSE."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from quotra.api.deps import CurrentCaller, RuntimeDep
from quotra.api.routing import BoundedRoute, errors
from quotra.bounds import ModelRef, TokenCount
from quotra.payments.x402_gate import X402Attempt

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
