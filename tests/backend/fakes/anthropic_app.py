"""Fake Anthropic Messages API: `POST /v1/messages` (plain and SSE) and `GET /v1/models`, with
Anthropic's headers, validation, error bodies and event framing (`event:` + `data:` lines)."""

from __future__ import annotations

import secrets
from typing import Any

import anyio
from quotra.upstream._http import json_dumps
from quotra_dev.localmodel import json_response
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import scenarios as s
from ._common import broken_json, paced, record, sse
from .recorder import Recorder

PROVIDER = "anthropic"
VERSION = "2023-06-01"

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
ERROR_MESSAGES = {
    400: 'messages: roles must alternate between "user" and "assistant"',
    429: "Number of request tokens has exceeded your per-minute rate limit",
    500: "Internal server error",
    529: "Overloaded",
}


def error(status: int, message: str | None = None, headers: dict[str, str] | None = None) -> Response:
    kind = ERROR_TYPES.get(status, "api_error")
    body = {
        "type": "error",
        "error": {"type": kind, "message": message or ERROR_MESSAGES.get(status, kind)},
        "request_id": "req_" + secrets.token_hex(12),
    }
    return json_response(body, status, headers)


def _validate(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str):
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: Field required"
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("user", "assistant"):
            return (
                f'messages.{i}.role: Unexpected role "{role}". The Messages API accepts a top-level '
                '`system` parameter, not "system" as an input message role.'
            )
        if i and messages[i - 1]["role"] == role:
            return ERROR_MESSAGES[400]
    if "stop" in body:
        return "stop: Extra inputs are not permitted"
    stops = body.get("stop_sequences", [])
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        return "stop_sequences: Input should be a valid list"
    temperature = body.get("temperature", 1.0)
    if not 0 <= temperature <= 1:
        return "temperature: range: 0..1"
    return None


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [block.get("text", "") for block in content if block.get("type") == "text"]


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json_dumps(data) + b"\n\n"


def create_app(recorder: Recorder, api_key: str) -> Starlette:
    async def messages(request: Request) -> Response:
        body = await record(recorder, PROVIDER, request)
        model = body.get("model", "") if isinstance(body, dict) else ""
        key = request.headers.get("x-api-key", "")
        if model == s.ECHO_KEY:
            return error(401, f"invalid x-api-key: {key}")
        if key != api_key:
            return error(401, "invalid x-api-key")
        if request.headers.get("anthropic-version") != VERSION:
            return error(400, "anthropic-version: header is required")
        problem = _validate(body)
        if problem:
            return error(400, problem)
        status = s.error_status(model)
        if status is not None:
            headers = {"retry-after": str(s.RETRY_AFTER_SECONDS)} if status == 429 else None
            return error(status, headers=headers)
        if model == s.SLOW:
            await anyio.sleep(s.SLOW_SECONDS)

        system = body.get("system", "")
        inputs = [system] if isinstance(system, str) else _texts(system)
        last_user = ""
        for message in body["messages"]:
            texts = _texts(message["content"])
            inputs.extend(texts)
            if message["role"] == "user" and texts:
                last_user = "".join(texts)
        reply = s.echo_reply(last_user, body["max_tokens"], body.get("stop_sequences", []))
        input_tokens = s.count_tokens(*inputs)
        if reply.hit_limit:
            stop_reason = "max_tokens"
        elif reply.stop_sequence:
            stop_reason = "stop_sequence"
        else:
            stop_reason = "end_turn"
        content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}]
        tool = (body.get("tools") or [{}])[0].get("name")
        if model == s.TOOL and tool:
            content.append(
                {"type": "tool_use", "id": "toolu_01Fake", "name": tool, "input": {"city": "Paris"}}
            )
            stop_reason = "tool_use"
        message_id = "msg_" + secrets.token_hex(12)
        message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": reply.stop_sequence,
            "usage": {
                "input_tokens": input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": reply.output_tokens,
            },
        }
        if not body.get("stream"):
            if model == s.BREAK:
                return broken_json(json_dumps(message))
            return json_response(message)

        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**message["usage"], "output_tokens": 1},
        }
        frames = [
            _event("message_start", {"type": "message_start", "message": start}),
            _event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            _event("ping", {"type": "ping"}),
        ]
        for piece in reply.pieces:
            delta = {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece},
            }
            frames.append(_event("content_block_delta", delta))
        frames.append(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        if model == s.TOOL and tool:
            block = {"type": "tool_use", "id": "toolu_01Fake", "name": tool, "input": {}}
            frames.append(
                _event(
                    "content_block_start", {"type": "content_block_start", "index": 1, "content_block": block}
                )
            )
            for part in ('{"city": ', '"Paris"}'):
                delta = {
                    "type": "content_block_delta",
                    "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": part},
                }
                frames.append(_event("content_block_delta", delta))
            frames.append(_event("content_block_stop", {"type": "content_block_stop", "index": 1}))
        frames.append(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": reply.stop_sequence},
                    "usage": {"output_tokens": reply.output_tokens},
                },
            )
        )
        frames.append(_event("message_stop", {"type": "message_stop"}))

        if model in (s.BREAK, s.TRUNCATE):
            return sse(recorder, PROVIDER, model, paced(frames[:5], abort=model == s.BREAK))
        if model == s.STREAM_ERROR:
            failure = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            return sse(recorder, PROVIDER, model, paced([*frames[:5], _event("error", failure)]))
        delay = s.DRIP_DELAY if model == s.DRIP else 0.0
        return sse(recorder, PROVIDER, model, paced(frames, delay=delay))

    async def models(request: Request) -> Response:
        await record(recorder, PROVIDER, request)
        if request.headers.get("x-api-key") != api_key:
            return error(401, "invalid x-api-key")
        if request.headers.get("anthropic-version") != VERSION:
            return error(400, "anthropic-version: header is required")
        data = [
            {
                "type": "model",
                "id": "claude-sonnet-4-5",
                "display_name": "Claude Sonnet 4.5",
                "created_at": "2025-09-29T00:00:00Z",
            }
        ]
        return json_response(
            {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[0]["id"]}
        )

    async def not_found(request: Request) -> Response:
        return error(404, "Not found")

    return Starlette(
        routes=[
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/{path:path}", not_found),
        ]
    )
