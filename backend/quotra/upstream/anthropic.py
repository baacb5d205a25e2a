"""Anthropic Messages API upstream: OpenAI chat requests become `POST /v1/messages`, and
messages and their SSE events become OpenAI completions and chunks.

The translation functions are pure so the sandbox can run synthetic Anthropic answers through
exactly the same code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import aiohttp

from ._http import HTTPAdapter, clip, error_for_status, json_dumps, now, redact
from ._shapes import (
    JSON,
    ChunkFactory,
    bad_request,
    completion_id,
    max_tokens_of,
    openai_choice,
    openai_completion,
    parse_data_url,
    stop_list,
    text_of,
    tool_arguments,
)
from .base import Completion, UpstreamError, Usage

PROVIDER = "anthropic"
DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
# Anthropic requires max_tokens; OpenAI clients usually omit it. Every current Claude model can
# produce at least this many output tokens.
DEFAULT_MAX_TOKENS = 4096

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Status codes Anthropic documents for each error type, for errors that arrive inside a stream.
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


# --------------------------------------------------------------------------------------------
# OpenAI request → Anthropic request
# --------------------------------------------------------------------------------------------


def _image_block(part: JSON) -> JSON:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise bad_request(PROVIDER, "image_url part without a url")
    inline = parse_data_url(url)
    if inline is not None:
        return {"type": "image", "source": {"type": "base64", "media_type": inline[0], "data": inline[1]}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _user_blocks(content: Any) -> list[JSON]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        if content is None:
            return []
        raise bad_request(PROVIDER, "message content must be a string or an array of parts")
    blocks: list[JSON] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image_block(part))
        else:
            raise bad_request(PROVIDER, f"content part type {kind!r} is not supported")
    return blocks


def _assistant_blocks(message: JSON) -> list[JSON]:
    blocks: list[JSON] = []
    text = text_of(message.get("content"))
    if text:
        blocks.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": tool_arguments(function.get("arguments")),
            }
        )
    return blocks


def _tools(tools: Any) -> list[JSON]:
    out: list[JSON] = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(PROVIDER, "only function tools are supported")
        function = tool.get("function") or {}
        spec: JSON = {
            "name": function.get("name"),
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if function.get("description"):
            spec["description"] = function["description"]
        out.append(spec)
    return out


def _tool_choice(choice: Any, parallel: Any) -> JSON | None:
    result: JSON | None
    if choice is None:
        result = None
    elif choice == "auto":
        result = {"type": "auto"}
    elif choice == "required":
        result = {"type": "any"}
    elif choice == "none":
        result = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        result = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise bad_request(PROVIDER, f"unsupported tool_choice {choice!r}")
    if parallel is False:
        result = {**(result or {"type": "auto"}), "disable_parallel_tool_use": True}
    return result


def build_request(request: JSON, model: str, *, stream: bool) -> JSON:
    """An OpenAI chat request as an Anthropic Messages request body."""
    n = request.get("n")
    if isinstance(n, int) and n > 1:
        raise bad_request(PROVIDER, "n > 1 is not supported")
    system: list[str] = []
    messages: list[JSON] = []
    for message in request.get("messages") or ():
        role = message.get("role")
        if role in ("system", "developer"):
            text = text_of(message.get("content"))
            if text:
                system.append(text)
            continue
        if role == "user":
            target, blocks = "user", _user_blocks(message.get("content"))
        elif role == "assistant":
            target, blocks = "assistant", _assistant_blocks(message)
        elif role == "tool":
            target = "user"
            blocks = [
                {
                    "type": "tool_result",
                    "tool_use_id": message.get("tool_call_id"),
                    "content": text_of(message.get("content")),
                }
            ]
        else:
            raise bad_request(PROVIDER, f"unsupported message role {role!r}")
        if not blocks:
            continue
        # Anthropic wants alternating turns; OpenAI allows runs (several tool results in a row).
        if messages and messages[-1]["role"] == target:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": target, "content": blocks})

    body: JSON = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens_of(request) or DEFAULT_MAX_TOKENS,
    }
    if system:
        body["system"] = "\n\n".join(system)
    temperature = request.get("temperature")
    if isinstance(temperature, int | float):
        body["temperature"] = min(max(float(temperature), 0.0), 1.0)  # OpenAI's range is 0-2
    if request.get("top_p") is not None:
        body["top_p"] = request["top_p"]
    stops = stop_list(request.get("stop"))
    if stops:
        body["stop_sequences"] = stops
    if request.get("tools"):
        body["tools"] = _tools(request["tools"])
    tool_choice = _tool_choice(request.get("tool_choice"), request.get("parallel_tool_calls"))
    if tool_choice is not None and request.get("tools"):
        body["tool_choice"] = tool_choice
    if isinstance(request.get("user"), str):
        body["metadata"] = {"user_id": request["user"]}
    if stream:
        body["stream"] = True
    return body


# --------------------------------------------------------------------------------------------
# Anthropic answers → OpenAI
# --------------------------------------------------------------------------------------------


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _input_tokens(usage: JSON) -> int:
    # Cached prompt tokens are reported apart from `input_tokens` but are still prompt tokens.
    return (
        _int(usage.get("input_tokens"))
        + _int(usage.get("cache_creation_input_tokens"))
        + _int(usage.get("cache_read_input_tokens"))
    )


def finish_reason(stop_reason: Any) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(stop_reason, "stop")


def translate_message(raw: JSON, model: str) -> Completion:
    """An Anthropic `message` object as an OpenAI chat completion."""
    texts: list[str] = []
    tool_calls: list[JSON] = []
    for block in raw.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": json_dumps(block.get("input") or {}).decode(),
                    },
                }
            )
        # thinking / redacted_thinking blocks have no OpenAI chat equivalent
    raw_usage = raw.get("usage") or {}
    usage = Usage(_input_tokens(raw_usage), _int(raw_usage.get("output_tokens")))
    content = "".join(texts) if texts or not tool_calls else None
    body = openai_completion(
        id=raw.get("id") or completion_id(),
        created=now(),
        model=raw.get("model") or model,
        choices=[openai_choice(0, content, tool_calls, finish_reason(raw.get("stop_reason")))],
        usage=usage,
    )
    return Completion(body=body, usage=usage)


def stream_error(error: Any, secret: str = "") -> UpstreamError:
    error = error if isinstance(error, dict) else {}
    error_type = error.get("type")
    message = clip(redact(str(error.get("message") or "stream error"), secret))
    return error_for_status(
        ERROR_STATUS.get(error_type, 502) if isinstance(error_type, str) else 502,
        f"anthropic upstream stream failed: {message}",
        provider=PROVIDER,
        error_type=error_type if isinstance(error_type, str) else None,
    )


class StreamTranslator:
    """Turns Anthropic stream events (decoded `data:` payloads) into OpenAI chunks.

    `done` becomes true at `message_stop`, which also yields the final usage chunk.
    """

    def __init__(self, model: str, secret: str = "") -> None:
        self.done = False
        self._model = model
        self._secret = secret
        self._chunks: ChunkFactory | None = None
        self._input = 0
        self._output = 0
        self._tools: dict[int, int] = {}  # content block index → OpenAI tool call index

    @property
    def usage(self) -> Usage:
        return Usage(self._input, self._output)

    def _factory(self) -> ChunkFactory:
        if self._chunks is None:
            self._chunks = ChunkFactory(completion_id(), now(), self._model)
        return self._chunks

    def feed(self, event: JSON) -> list[JSON]:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            delta_type = delta.get("type")
            if delta_type == "text_delta":
                return [self._factory().delta({"content": delta.get("text", "")})]
            if delta_type == "input_json_delta":
                index = self._tools.get(_int(event.get("index")))
                if index is None:
                    return []
                arguments = {"function": {"arguments": delta.get("partial_json", "")}}
                return [self._factory().delta({"tool_calls": [{"index": index, **arguments}]})]
            return []  # thinking_delta, signature_delta, citations_delta
        if kind == "message_start":
            message = event.get("message") or {}
            self._chunks = ChunkFactory(
                message.get("id") or completion_id(), now(), message.get("model") or self._model
            )
            usage = message.get("usage") or {}
            self._input = _input_tokens(usage)
            self._output = _int(usage.get("output_tokens"))
            return [self._chunks.delta({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self._tools[_int(event.get("index"))] = len(self._tools)
                call = {
                    "index": index,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return [self._factory().delta({"tool_calls": [call]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._factory().delta({"content": block["text"]})]
            return []
        if kind == "message_delta":
            usage = event.get("usage") or {}
            if "output_tokens" in usage:
                self._output = _int(usage["output_tokens"])  # cumulative
            if usage.get("input_tokens") is not None:
                self._input = _input_tokens(usage)
            reason = finish_reason((event.get("delta") or {}).get("stop_reason"))
            return [self._factory().delta({}, reason)] if reason else []
        if kind == "message_stop":
            self.done = True
            return [self._factory().usage(self.usage)]
        if kind == "error":
            raise stream_error(event.get("error"), self._secret)
        return []  # ping, content_block_stop, and event types added later


# --------------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------------


class AnthropicAdapter(HTTPAdapter):
    kind = PROVIDER

    def __init__(self, *, session: aiohttp.ClientSession, base_url: str | None = None) -> None:
        super().__init__(session=session)
        base = (base_url or DEFAULT_BASE_URL).rstrip("/").removesuffix("/v1")
        self._messages_url = base + "/v1/messages"
        self._models_url = base + "/v1/models"
        self._static_headers = {
            "content-type": "application/json",
            "accept": "application/json",
            "anthropic-version": API_VERSION,
        }

    def _headers(self, api_key: str) -> dict[str, str]:
        return {**self._static_headers, "x-api-key": api_key}

    async def complete(self, request: dict[str, Any], *, api_key: str, model: str) -> Completion:
        body = build_request(request, model, stream=False)
        raw = await self._post_json(self._messages_url, body, api_key)
        if raw.get("type") == "error":
            raise stream_error(raw.get("error"), api_key)
        return translate_message(raw, model)

    async def stream(
        self, request: dict[str, Any], *, api_key: str, model: str
    ) -> AsyncIterator[dict[str, Any]]:
        body = build_request(request, model, stream=True)
        translator = StreamTranslator(model, api_key)
        events = self._events(self._messages_url, body, api_key, lambda: translator.done)
        async with aclosing(events):
            async for event in events:
                data = self._decode_event(event.data)
                if not isinstance(data, dict):
                    raise self._invalid_json()
                for chunk in translator.feed(data):
                    yield chunk
        if not translator.done:
            raise self._broken("ended before message_stop")

    async def check_key(self, api_key: str) -> None:
        await self._get(self._models_url, api_key)
