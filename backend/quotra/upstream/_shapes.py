"""OpenAI request/response pieces the translating adapters (Anthropic, Gemini, sandbox) share."""

from __future__ import annotations

import secrets
from typing import Any

from ._http import JSON_ERRORS, json_loads
from .base import UpstreamBadRequest, Usage

JSON = dict[str, Any]


def bad_request(provider: str, message: str) -> UpstreamBadRequest:
    return UpstreamBadRequest(f"{provider} upstream: {message}", provider=provider)


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def max_tokens_of(request: JSON) -> int | None:
    value = request.get("max_completion_tokens")
    if value is None:
        value = request.get("max_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def stop_list(stop: Any) -> list[str]:
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list):
        return [s for s in stop if isinstance(s, str) and s]
    return []


def text_of(content: Any) -> str:
    """The text of an OpenAI message `content`: a string, or the text parts of a parts array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text") or p.get("refusal") or ""
            for p in content
            if isinstance(p, dict) and p.get("type") in ("text", "refusal")
        )
    return ""


def parse_data_url(url: str) -> tuple[str, str] | None:
    """`data:image/png;base64,AAAA` → ("image/png", "AAAA")."""
    if not url.startswith("data:"):
        return None
    header, sep, data = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        return None
    return header[: -len(";base64")] or "application/octet-stream", data


def tool_arguments(raw: Any) -> Any:
    """OpenAI carries tool arguments as a JSON string; the others want the object."""
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {}
    try:
        value = json_loads(raw)
    except JSON_ERRORS:
        return {"_raw": raw}
    return value if isinstance(value, dict) else {"value": value}


def openai_completion(
    *,
    id: str,
    created: int,
    model: str,
    choices: list[JSON],
    usage: Usage,
) -> JSON:
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage.to_openai(),
    }


def openai_choice(index: int, content: str | None, tool_calls: list[JSON], finish_reason: str | None) -> JSON:
    message: JSON = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}


class ChunkFactory:
    """Builds `chat.completion.chunk` dicts that share one id, timestamp and model."""

    __slots__ = ("created", "id", "model")

    def __init__(self, id: str, created: int, model: str) -> None:
        self.id = id
        self.created = created
        self.model = model

    def delta(self, delta: JSON, finish_reason: str | None = None, index: int = 0) -> JSON:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def usage(self, usage: Usage) -> JSON:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage.to_openai(),
        }
