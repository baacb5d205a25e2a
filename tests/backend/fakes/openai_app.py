"""Fake OpenAI: `quotra_dev.localmodel` (the real-format local model server) plus the
failure scenarios of `scenarios`, with OpenAI's error bodies and SSE framing."""

from __future__ import annotations

from typing import Any

import anyio
from quotra.upstream._http import json_dumps
from quotra.upstream.sandbox import openai_reply, openai_reply_chunks
from quotra_dev.localmodel import (
    chat_completions,
    check_bearer,
    json_response,
    list_models,
    openai_error,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import scenarios as s
from ._common import broken_json, paced, record, sse
from .recorder import Recorder

PROVIDER = "openai"
MODELS = ("gpt-4o-mini", s.MODEL)

# OpenAI's documented error bodies for each status.
ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid value for 'temperature': must be between 0 and 2.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to sample from this model", "invalid_request_error", None),
    404: (
        "The model `fake` does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    422: ("Unprocessable entity.", "invalid_request_error", None),
    429: (
        "Rate limit reached for gpt-4o-mini in organization org-fake on requests per min (RPM): "
        "Limit 3, Used 3, Requested 1. Please try again in 7s.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


def _error(status: int) -> Response:
    message, kind, code = ERRORS.get(status, ("Upstream error.", "server_error", None))
    headers = {"retry-after": str(s.RETRY_AFTER_SECONDS)} if status == 429 else None
    return openai_error(status, message, type=kind, code=code, headers=headers)


def _frames(chunks: list[dict[str, Any]]) -> list[bytes]:
    return [b"data: " + json_dumps(chunk) + b"\n\n" for chunk in chunks]


def _quirky_frames(chunks: list[dict[str, Any]]) -> list[bytes]:
    # Legal SSE that naive parsers get wrong: comments, CRLF, one JSON split over two data lines.
    frames = [b": keep-alive\r\n\r\n"]
    for chunk in chunks:
        encoded = json_dumps(chunk)
        cut = encoded.index(b",") + 1
        frames.append(b"data:" + encoded[:cut] + b"\r\ndata: " + encoded[cut:] + b"\r\n\r\n")
        frames.append(b": still processing\r\n\r\n")
    return [*frames, b"data: [DONE]\r\n\r\n"]


def create_app(recorder: Recorder, api_key: str) -> Starlette:
    async def completions(request: Request) -> Response:
        body = await record(recorder, PROVIDER, request)
        model = body.get("model", "") if isinstance(body, dict) else ""
        if model == s.ECHO_KEY:
            token = request.headers.get("authorization", "").removeprefix("Bearer ")
            return openai_error(401, f"Incorrect API key provided: {token}.", code="invalid_api_key")
        denied = check_bearer(request, api_key)
        if denied is not None:
            return denied
        status = s.error_status(model)
        if status is not None:
            return _error(status)
        if model == s.SLOW:
            await anyio.sleep(s.SLOW_SECONDS)
        streaming = bool(body.get("stream"))
        if not streaming and model == s.BREAK:
            return broken_json(json_dumps(openai_reply(body, model).body))
        on_close = lambda completed: recorder.record_close(PROVIDER, model, completed)  # noqa: E731
        if not streaming or model not in (s.BREAK, s.TRUNCATE, s.STREAM_ERROR, s.SSE_QUIRKS):
            delay = s.DRIP_DELAY if model == s.DRIP else 0.0
            return await chat_completions(
                request, api_key=api_key, models=None, chunk_delay=delay, on_stream_close=on_close
            )
        chunks = openai_reply_chunks(body, model)
        if model == s.SSE_QUIRKS:
            return sse(recorder, PROVIDER, model, paced(_quirky_frames(chunks)))
        if model == s.STREAM_ERROR:
            failure = {
                "error": {"message": ERRORS[500][0], "type": "server_error", "param": None, "code": None}
            }
            frames = [*_frames(chunks[:3]), b"data: " + json_dumps(failure) + b"\n\n"]
            return sse(recorder, PROVIDER, model, paced(frames))
        # BREAK drops the connection, TRUNCATE ends the body cleanly; neither reaches [DONE].
        return sse(recorder, PROVIDER, model, paced(_frames(chunks[:3]), abort=model == s.BREAK))

    async def models(request: Request) -> Response:
        await record(recorder, PROVIDER, request)
        return await list_models(request, api_key=api_key, models=MODELS)

    async def not_found(request: Request) -> Response:
        return json_response({"error": {"message": "Not found", "type": "invalid_request_error"}}, 404)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/{path:path}", not_found),
        ]
    )
