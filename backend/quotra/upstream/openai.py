"""OpenAI and OpenAI-compatible upstreams: the request passes through with the listing's model,
and the answer comes back as it is, except that usage is guaranteed (estimated if the server
reports none) and streamed usage always arrives as one final `choices == []` chunk."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ._http import HTTPAdapter, clip, error_fields, error_for_status, now, redact
from .base import Completion, UpstreamError, Usage, approx_tokens

DEFAULT_BASE_URL = "https://api.openai.com"


def api_root(base_url: str) -> str:
    """`https://api.openai.com` → `https://api.openai.com/v1`; a URL with a path is taken as the
    API root as the OpenAI SDK takes it (`http://host:8000/v1`, `https://openrouter.ai/api/v1`)."""
    base = base_url.rstrip("/")
    return base if urlsplit(base).path else base + "/v1"


def usage_from(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    prompt = raw.get("prompt_tokens")
    completion = raw.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion)


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return 0


def estimate_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return approx_tokens(sum(_content_chars(m.get("content")) for m in messages if isinstance(m, dict)))


def _completion_chars(choices: Iterable[Any], key: str) -> int:
    chars = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        message = choice.get(key)
        if not isinstance(message, dict):
            continue
        chars += _content_chars(message.get("content"))
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                chars += len(function.get("name") or "") + len(function.get("arguments") or "")
    return chars


class OpenAIAdapter(HTTPAdapter):
    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        base_url: str | None = None,
        kind: str = "openai",
    ) -> None:
        super().__init__(session=session)
        self.kind = kind
        root = api_root(base_url or DEFAULT_BASE_URL)
        self._completions_url = root + "/chat/completions"
        self._models_url = root + "/models"
        self._anonymous_headers = {"content-type": "application/json", "accept": "application/json"}

    def _headers(self, api_key: str) -> dict[str, str]:
        if not api_key:  # local OpenAI-compatible servers often run without a key
            return self._anonymous_headers
        return {**self._anonymous_headers, "authorization": "Bearer " + api_key}

    async def complete(self, request: dict[str, Any], *, api_key: str, model: str) -> Completion:
        body = {**request, "model": model, "stream": False}
        body.pop("stream_options", None)
        data = await self._post_json(self._completions_url, body, api_key)
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise self._invalid_json()
        usage = usage_from(data.get("usage"))
        if usage is None:
            usage = Usage(
                estimate_prompt_tokens(request.get("messages")),
                approx_tokens(_completion_chars(choices, "message")),
            )
            data["usage"] = usage.to_openai()
        return Completion(body=data, usage=usage)

    async def stream(
        self, request: dict[str, Any], *, api_key: str, model: str
    ) -> AsyncIterator[dict[str, Any]]:
        options = request.get("stream_options")
        body = {
            **request,
            "model": model,
            "stream": True,
            "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True},
        }
        usage_chunk: dict[str, Any] | None = None
        reported: Usage | None = None
        last: dict[str, Any] = {}
        completion_chars = 0
        finished = False
        done = False
        events = self._events(self._completions_url, body, api_key, lambda: done)
        async with aclosing(events):
            async for event in events:
                if event.data == "[DONE]":
                    done = True
                    yield self._final_chunk(usage_chunk, reported, last, request, model, completion_chars)
                    continue
                chunk = self._decode_event(event.data)
                if not isinstance(chunk, dict):
                    raise self._invalid_json()
                if "error" in chunk and not chunk.get("choices"):
                    raise self._stream_error(chunk, api_key)
                choices = chunk.get("choices") or []
                usage = usage_from(chunk.get("usage"))
                if usage is not None:
                    reported = usage
                    if not choices:
                        usage_chunk = chunk  # sent last, after anything that may still follow
                        continue
                    chunk["usage"] = None  # usage travels only on the final chunk
                last = chunk
                if choices:
                    completion_chars += _completion_chars(choices, "delta")
                    finished = finished or any(
                        isinstance(c, dict) and c.get("finish_reason") for c in choices
                    )
                yield chunk
        if done:
            return
        # Some compatible servers omit `[DONE]`; a finish reason plus usage still proves the end.
        if not (finished and reported is not None):
            raise self._broken("ended before [DONE]")
        yield self._final_chunk(usage_chunk, reported, last, request, model, completion_chars)

    @staticmethod
    def _final_chunk(
        usage_chunk: dict[str, Any] | None,
        reported: Usage | None,
        last: dict[str, Any],
        request: dict[str, Any],
        model: str,
        completion_chars: int,
    ) -> dict[str, Any]:
        if usage_chunk is not None:
            return usage_chunk
        if reported is None:
            reported = Usage(estimate_prompt_tokens(request.get("messages")), approx_tokens(completion_chars))
        return {
            "id": last.get("id", ""),
            "object": "chat.completion.chunk",
            "created": last.get("created", now()),
            "model": last.get("model", model),
            "choices": [],
            "usage": reported.to_openai(),
        }

    def _stream_error(self, chunk: dict[str, Any], api_key: str) -> UpstreamError:
        message, error_type = error_fields(chunk, "stream error")
        status = chunk["error"].get("code") if isinstance(chunk.get("error"), dict) else None
        # An error after a 200 is the upstream failing mid-answer unless it says otherwise.
        return error_for_status(
            status if isinstance(status, int) and 400 <= status < 600 else 502,
            f"{self.kind} upstream stream failed: {clip(redact(message, api_key))}",
            provider=self.kind,
            error_type=error_type,
        )

    async def check_key(self, api_key: str) -> None:
        await self._get(self._models_url, api_key)
