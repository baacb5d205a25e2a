"""The `sandbox` upstream: deterministic synthetic answers without any network call, so a
listing can be exercised through the whole metering and settlement path for free.

The reply echoes a short summary of the last user message ("Sandbox reply to: ..."), honours
`stop` and `max_tokens` (finish reason `length`), and reports usage at about four characters per
token. The model name picks the wire format that is synthesized and then translated back by the
real adapters' translators: `claude-*` → Anthropic Messages, `gemini-*` → Gemini
generateContent, anything else → OpenAI. A model ending in `error-<status>` (for example
`sandbox-error-503`) fails the way an upstream answering that status would.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from . import anthropic, gemini
from ._http import error_for_status, now
from ._shapes import (
    JSON,
    ChunkFactory,
    completion_id,
    max_tokens_of,
    openai_choice,
    openai_completion,
    stop_list,
    text_of,
)
from .base import Completion, UpstreamBadRequest, Usage, approx_tokens

_ERROR_MODEL = re.compile(r"error-(\d{3})$")
_PIECES = re.compile(r"\S+\s*|\s+")
_SUMMARY_CHARS = 80


@dataclass(slots=True)
class Reply:
    text: str
    finish: str  # "stop" or "length"
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int

    def pieces(self) -> list[str]:
        """The text as streamed: one piece per word, whitespace kept, so the pieces join back."""
        return _PIECES.findall(self.text)


def compose(last_user: str, prompt_chars: int, max_tokens: int | None, stops: list[str]) -> Reply:
    summary = " ".join(last_user.split())
    if len(summary) > _SUMMARY_CHARS:
        summary = summary[: _SUMMARY_CHARS - 3].rstrip() + "..."
    text = f"Sandbox reply to: {summary}" if summary else "Sandbox reply: there was no user message."
    finish, matched = "stop", None
    for stop in stops:  # each cut leaves only text before it, so the earliest stop wins
        at = text.find(stop)
        if at != -1:
            text, matched = text[:at], stop
    if max_tokens is not None and len(text) > max_tokens * 4:
        text, finish, matched = text[: max(0, max_tokens) * 4], "length", None
    return Reply(text, finish, matched, approx_tokens(prompt_chars), approx_tokens(len(text)))


def _fail_if_asked(model: str) -> None:
    match = _ERROR_MODEL.search(model)
    if match is None:
        return
    status = int(match.group(1))
    raise error_for_status(
        status,
        f"sandbox upstream answered {status}: simulated failure for model {model!r}",
        provider="sandbox",
        retry_after=1.0 if status == 429 else None,
    )


def _shape(model: str) -> str:
    lowered = model.lower()
    if lowered.startswith("claude"):
        return "anthropic"
    if lowered.startswith("gemini"):
        return "gemini"
    return "openai"


# --------------------------------------------------------------------------------------------
# OpenAI shape (also what `localmodel` serves)
# --------------------------------------------------------------------------------------------


def _openai_reply(request: JSON) -> tuple[Reply, int]:
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UpstreamBadRequest("sandbox upstream: messages must be a non-empty array", provider="sandbox")
    prompt_chars = 0
    last_user = ""
    for message in messages:
        text = text_of(message.get("content")) if isinstance(message, dict) else ""
        prompt_chars += len(text)
        if isinstance(message, dict) and message.get("role") == "user":
            last_user = text
    n = request.get("n")
    choices = n if isinstance(n, int) and n > 1 else 1
    return compose(last_user, prompt_chars, max_tokens_of(request), stop_list(request.get("stop"))), choices


def openai_reply(request: JSON, model: str) -> Completion:
    """The synthetic answer to an OpenAI chat request, as an OpenAI chat completion."""
    reply, n = _openai_reply(request)
    usage = Usage(reply.prompt_tokens, reply.completion_tokens * n)
    choices = [openai_choice(i, reply.text, [], reply.finish) for i in range(n)]
    body = openai_completion(id=completion_id(), created=now(), model=model, choices=choices, usage=usage)
    return Completion(body=body, usage=usage)


def openai_reply_chunks(request: JSON, model: str) -> list[JSON]:
    """The synthetic answer as OpenAI stream chunks, the last one carrying usage."""
    reply, n = _openai_reply(request)
    factory = ChunkFactory(completion_id(), now(), model)
    chunks: list[JSON] = []
    for index in range(n):
        chunks.append(factory.delta({"role": "assistant", "content": ""}, index=index))
        chunks.extend(factory.delta({"content": piece}, index=index) for piece in reply.pieces())
        chunks.append(factory.delta({}, reply.finish, index=index))
    chunks.append(factory.usage(Usage(reply.prompt_tokens, reply.completion_tokens * n)))
    return chunks


# --------------------------------------------------------------------------------------------
# Anthropic shape: synthesize a Messages answer, then translate it like a real one
# --------------------------------------------------------------------------------------------


def _anthropic_reply(raw_request: JSON) -> Reply:
    system = raw_request.get("system") or ""
    prompt_chars = len(system) if isinstance(system, str) else 0
    last_user = ""
    for message in raw_request["messages"]:
        texts = [b.get("text") or "" for b in message["content"] if b.get("type") == "text"]
        prompt_chars += sum(map(len, texts))
        if message["role"] == "user" and texts:
            last_user = "".join(texts)
    return compose(
        last_user, prompt_chars, raw_request["max_tokens"], raw_request.get("stop_sequences") or []
    )


def _anthropic_stop_reason(reply: Reply) -> str:
    if reply.finish == "length":
        return "max_tokens"
    return "stop_sequence" if reply.stop_sequence else "end_turn"


def _anthropic_message(raw_request: JSON, model: str) -> JSON:
    reply = _anthropic_reply(raw_request)
    return {
        "id": "msg_sandbox_" + secrets.token_hex(10),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": reply.text}],
        "stop_reason": _anthropic_stop_reason(reply),
        "stop_sequence": reply.stop_sequence,
        "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens},
    }


def _anthropic_events(raw_request: JSON, model: str) -> Iterator[JSON]:
    reply = _anthropic_reply(raw_request)
    message = _anthropic_message(raw_request, model)
    yield {
        "type": "message_start",
        "message": {
            **message,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": 1},
        },
    }
    yield {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    yield {"type": "ping"}
    for piece in reply.pieces():
        yield {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
    yield {"type": "content_block_stop", "index": 0}
    yield {
        "type": "message_delta",
        "delta": {"stop_reason": _anthropic_stop_reason(reply), "stop_sequence": reply.stop_sequence},
        "usage": {"output_tokens": reply.completion_tokens},
    }
    yield {"type": "message_stop"}


# --------------------------------------------------------------------------------------------
# Gemini shape
# --------------------------------------------------------------------------------------------


def _gemini_reply(raw_request: JSON) -> Reply:
    prompt_chars = 0
    system = raw_request.get("systemInstruction")
    if system:
        prompt_chars += sum(len(p.get("text") or "") for p in system["parts"])
    last_user = ""
    for content in raw_request["contents"]:
        texts = [p["text"] for p in content["parts"] if "text" in p]
        prompt_chars += sum(map(len, texts))
        if content["role"] == "user" and texts:
            last_user = "".join(texts)
    config = raw_request.get("generationConfig") or {}
    return compose(last_user, prompt_chars, config.get("maxOutputTokens"), config.get("stopSequences") or [])


def _gemini_usage(reply: Reply) -> JSON:
    return {
        "promptTokenCount": reply.prompt_tokens,
        "candidatesTokenCount": reply.completion_tokens,
        "totalTokenCount": reply.prompt_tokens + reply.completion_tokens,
    }


def _gemini_response(raw_request: JSON, model: str) -> JSON:
    reply = _gemini_reply(raw_request)
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": reply.text}]},
                "finishReason": "MAX_TOKENS" if reply.finish == "length" else "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": _gemini_usage(reply),
        "modelVersion": model,
        "responseId": "sandbox-" + secrets.token_hex(10),
    }


def _gemini_stream(raw_request: JSON, model: str) -> Iterator[JSON]:
    reply = _gemini_reply(raw_request)
    response_id = "sandbox-" + secrets.token_hex(10)
    pieces = reply.pieces() or [""]
    for i, piece in enumerate(pieces):
        candidate: JSON = {"content": {"role": "model", "parts": [{"text": piece}]}, "index": 0}
        usage: JSON = {"promptTokenCount": reply.prompt_tokens, "totalTokenCount": reply.prompt_tokens}
        if i == len(pieces) - 1:
            candidate["finishReason"] = "MAX_TOKENS" if reply.finish == "length" else "STOP"
            usage = _gemini_usage(reply)
        yield {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": response_id,
        }


# --------------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------------


class SandboxAdapter:
    kind = "sandbox"

    async def complete(self, request: dict[str, Any], *, api_key: str, model: str) -> Completion:
        _fail_if_asked(model)
        shape = _shape(model)
        if shape == "anthropic":
            raw_request = anthropic.build_request(request, model, stream=False)
            return anthropic.translate_message(_anthropic_message(raw_request, model), model)
        if shape == "gemini":
            return gemini.translate_response(_gemini_response(gemini.build_request(request), model), model)
        return openai_reply(request, model)

    async def stream(
        self, request: dict[str, Any], *, api_key: str, model: str
    ) -> AsyncIterator[dict[str, Any]]:
        _fail_if_asked(model)
        shape = _shape(model)
        if shape == "anthropic":
            raw_request = anthropic.build_request(request, model, stream=True)
            translator = anthropic.StreamTranslator(model)
            for event in _anthropic_events(raw_request, model):
                for chunk in translator.feed(event):
                    yield chunk
        elif shape == "gemini":
            gemini_translator = gemini.StreamTranslator(model)
            for response in _gemini_stream(gemini.build_request(request), model):
                for chunk in gemini_translator.feed(response):
                    yield chunk
            yield gemini_translator.finish()
        else:
            for chunk in openai_reply_chunks(request, model):
                yield chunk

    async def check_key(self, api_key: str) -> None:
        return None
