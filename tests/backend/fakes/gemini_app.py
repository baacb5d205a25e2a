"""Fake Gemini API: `models/{model}:generateContent`, `:streamGenerateContent?alt=sse` and
`GET /v1beta/models`, with Google's key header, strict field validation, `google.rpc` error
bodies and SSE framing (`data: <json>` + CRLF CRLF, no end marker)."""

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

PROVIDER = "gemini"

STATUSES = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    403: (
        "PERMISSION_DENIED",
        "Method doesn't allow unregistered callers (callers without established identity).",
    ),
    404: ("NOT_FOUND", "models/fake is not found for API version v1beta."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    500: (
        "INTERNAL",
        "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
    ),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
}
REQUEST_FIELDS = {
    "contents",
    "systemInstruction",
    "generationConfig",
    "tools",
    "toolConfig",
    "safetySettings",
    "cachedContent",
}
CONFIG_FIELDS = {
    "maxOutputTokens", "temperature", "topP", "topK", "stopSequences", "candidateCount", "seed",
    "presencePenalty", "frequencyPenalty", "responseMimeType", "responseSchema", "thinkingConfig",
}  # fmt: skip


def error(status: int, message: str | None = None, details: list[dict[str, Any]] | None = None) -> Response:
    name, default = STATUSES.get(status, ("UNKNOWN", "Unknown error."))
    body: dict[str, Any] = {"code": status, "message": message or default, "status": name}
    if details:
        body["details"] = details
    return json_response({"error": body}, status)


def bad_key(message: str = "API key not valid. Please pass a valid API key.") -> Response:
    info = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }
    return error(400, message, [info])


def _unknown(name: str, where: str) -> Response:
    return error(400, f'Invalid JSON payload received. Unknown name "{name}"{where}: Cannot find field.')


def _validate(body: Any) -> Response | None:
    if not isinstance(body, dict):
        return error(400, "Invalid JSON payload received.")
    for name in body:
        if name not in REQUEST_FIELDS:
            return _unknown(name, "")
    for name in body.get("generationConfig") or {}:
        if name not in CONFIG_FIELDS:
            return _unknown(name, ' at "generation_config"')
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return error(400, "* GenerateContentRequest.contents: contents is not specified")
    for content in contents:
        if content.get("role") not in ("user", "model"):
            return error(400, f"Please use a valid role: user, model. Got {content.get('role')!r}.")
        if not content.get("parts"):
            return error(400, "* GenerateContentRequest.contents: contents.parts must not be empty.")
    return None


def _texts(content: dict[str, Any]) -> list[str]:
    return [part["text"] for part in content.get("parts", ()) if "text" in part]


def _frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + json_dumps(payload) + b"\r\n\r\n"


def create_app(recorder: Recorder, api_key: str) -> Starlette:
    async def generate(request: Request) -> Response:
        body = await record(recorder, PROVIDER, request)
        model, _, method = request.path_params["rest"].partition(":")
        if method not in ("generateContent", "streamGenerateContent"):
            return error(404, f"Method {method!r} not found.")
        key = request.headers.get("x-goog-api-key")
        if model == s.ECHO_KEY:
            return bad_key(f"API key not valid: {key}")
        if not key:
            return error(403)
        if key != api_key:
            return bad_key()
        streaming = method == "streamGenerateContent"
        if streaming and request.query_params.get("alt") != "sse":
            return error(400, "this fake only streams with alt=sse")
        problem = _validate(body)
        if problem is not None:
            return problem
        status = s.error_status(model)
        if status is not None:
            details = None
            if status == 429:
                retry = {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{s.RETRY_AFTER_SECONDS}s",
                }
                details = [retry]
            return error(status, details=details)
        if model == s.SLOW:
            await anyio.sleep(s.SLOW_SECONDS)

        inputs = _texts(body.get("systemInstruction") or {})
        last_user = ""
        for content in body["contents"]:
            texts = _texts(content)
            inputs.extend(texts)
            if content["role"] == "user" and texts:
                last_user = "".join(texts)
        config = body.get("generationConfig") or {}
        reply = s.echo_reply(last_user, config.get("maxOutputTokens"), config.get("stopSequences", []))
        prompt_tokens = s.count_tokens(*inputs)
        usage = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": reply.output_tokens,
            "totalTokenCount": prompt_tokens + reply.output_tokens,
        }
        finish = "MAX_TOKENS" if reply.hit_limit else "STOP"
        declarations = (body.get("tools") or [{}])[0].get("functionDeclarations") or [{}]
        tool = declarations[0].get("name") if model == s.TOOL else None
        response_id = secrets.token_hex(8)
        version = model + "-001"

        if not streaming:
            parts: list[dict[str, Any]] = [{"text": reply.text}]
            if tool:
                parts.append({"functionCall": {"name": tool, "args": {"city": "Paris"}}})
            response = {
                "candidates": [
                    {
                        "content": {"parts": parts, "role": "model"},
                        "finishReason": finish,
                        "index": 0,
                        "avgLogprobs": -0.1,
                    }
                ],
                "usageMetadata": usage,
                "modelVersion": version,
                "responseId": response_id,
            }
            if model == s.BREAK:
                return broken_json(json_dumps(response))
            return json_response(response)

        # Gemini streams a few tokens per event; the last event carries finishReason and usage.
        step = 1 if model == s.DRIP else 2
        groups = ["".join(reply.pieces[i : i + step]) for i in range(0, len(reply.pieces), step)] or [""]
        frames = []
        for i, text in enumerate(groups):
            candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
            partial = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
            last = i == len(groups) - 1
            if last and tool:
                candidate["content"]["parts"].append(
                    {"functionCall": {"name": tool, "args": {"city": "Paris"}}}
                )
            if last:
                candidate["finishReason"] = finish
            frames.append(
                _frame(
                    {
                        "candidates": [candidate],
                        "usageMetadata": usage if last else partial,
                        "modelVersion": version,
                        "responseId": response_id,
                    }
                )
            )
        if model == s.BREAK:
            return sse(recorder, PROVIDER, model, paced(frames[:1], abort=True))
        if model == s.TRUNCATE:  # everything but the event with the finishReason
            return sse(recorder, PROVIDER, model, paced(frames[:-1]))
        if model == s.STREAM_ERROR:
            failure = {"error": {"code": 503, "message": STATUSES[503][1], "status": "UNAVAILABLE"}}
            return sse(recorder, PROVIDER, model, paced([frames[0], _frame(failure)]))
        delay = s.DRIP_DELAY if model == s.DRIP else 0.0
        return sse(recorder, PROVIDER, model, paced(frames, delay=delay))

    async def models(request: Request) -> Response:
        await record(recorder, PROVIDER, request)
        key = request.headers.get("x-goog-api-key")
        if not key:
            return error(403)
        if key != api_key:
            return bad_key()
        model = {
            "name": "models/gemini-2.5-flash",
            "displayName": "Gemini 2.5 Flash",
            "supportedGenerationMethods": ["generateContent", "countTokens"],
        }
        return json_response({"models": [model]})

    async def not_found(request: Request) -> Response:
        return error(404, "Not found")

    return Starlette(
        routes=[
            Route("/v1beta/models", models, methods=["GET"]),
            Route("/v1beta/models/{rest:path}", generate, methods=["POST"]),
            Route("/{path:path}", not_found),
        ]
    )
