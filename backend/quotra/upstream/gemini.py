"""Google Gemini upstream: OpenAI chat requests become `generateContent` /
`streamGenerateContent?alt=sse` calls, and their answers become OpenAI completions and chunks.

The translation functions are pure so the sandbox can run synthetic Gemini answers through
exactly the same code.
"""

from __future__ import annotations

import functools
import mimetypes
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any
from urllib.parse import quote

import aiohttp

from ._http import JSON_ERRORS, HTTPAdapter, clip, error_for_status, json_dumps, json_loads, now, redact
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
    tool_call_id,
)
from .base import Completion, UpstreamError, Usage

PROVIDER = "gemini"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
}

_TOOL_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}


# --------------------------------------------------------------------------------------------
# OpenAI request → Gemini request
# --------------------------------------------------------------------------------------------


def _media_part(url: str, default_type: str) -> JSON:
    inline = parse_data_url(url)
    if inline is not None:
        return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
    mime = mimetypes.guess_type(url.split("?", 1)[0])[0] or default_type
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def _user_parts(content: Any) -> list[JSON]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        if content is None:
            return []
        raise bad_request(PROVIDER, "message content must be a string or an array of parts")
    parts: list[JSON] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part["text"]:
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise bad_request(PROVIDER, "image_url part without a url")
            parts.append(_media_part(url, "image/jpeg"))
        elif kind == "input_audio":
            audio = part.get("input_audio") or {}
            mime = "audio/" + str(audio.get("format") or "wav")
            parts.append({"inlineData": {"mimeType": mime, "data": audio.get("data", "")}})
        else:
            raise bad_request(PROVIDER, f"content part type {kind!r} is not supported")
    return parts


def _function_response(content: Any) -> JSON:
    # Gemini wants an object; tool output is usually a string, sometimes a JSON object.
    text = text_of(content)
    try:
        value = json_loads(text) if text[:1] == "{" else None
    except JSON_ERRORS:
        value = None
    return value if isinstance(value, dict) else {"content": text}


def _tool_config(choice: Any) -> JSON | None:
    if choice is None:
        return None
    if isinstance(choice, str) and choice in _TOOL_MODES:
        return {"functionCallingConfig": {"mode": _TOOL_MODES[choice]}}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    raise bad_request(PROVIDER, f"unsupported tool_choice {choice!r}")


def build_request(request: JSON) -> JSON:
    """An OpenAI chat request as a Gemini `GenerateContentRequest` (the model goes in the URL)."""
    system: list[str] = []
    contents: list[JSON] = []
    call_names: dict[str, str] = {}  # tool_call_id → function name, for functionResponse parts
    for message in request.get("messages") or ():
        role = message.get("role")
        if role in ("system", "developer"):
            text = text_of(message.get("content"))
            if text:
                system.append(text)
            continue
        if role == "user":
            target, parts = "user", _user_parts(message.get("content"))
        elif role == "assistant":
            target = "model"
            text = text_of(message.get("content"))
            parts = [{"text": text}] if text else []
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                name = function.get("name") or ""
                call_names[call.get("id") or ""] = name
                parts.append(
                    {"functionCall": {"name": name, "args": tool_arguments(function.get("arguments"))}}
                )
        elif role == "tool":
            target = "user"
            name = call_names.get(message.get("tool_call_id") or "") or message.get("name") or "tool"
            parts = [
                {"functionResponse": {"name": name, "response": _function_response(message.get("content"))}}
            ]
        else:
            raise bad_request(PROVIDER, f"unsupported message role {role!r}")
        if not parts:
            continue
        if contents and contents[-1]["role"] == target:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": target, "parts": parts})

    body: JSON = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    config: JSON = {}
    max_tokens = max_tokens_of(request)
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    for source, target_key in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ):
        if request.get(source) is not None:
            config[target_key] = request[source]
    stops = stop_list(request.get("stop"))
    if stops:
        config["stopSequences"] = stops
    n = request.get("n")
    if isinstance(n, int) and n > 1:
        config["candidateCount"] = n
    response_format = request.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
    if config:
        body["generationConfig"] = config
    tools = request.get("tools")
    if tools:
        declarations: list[JSON] = []
        for tool in tools:
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise bad_request(PROVIDER, "only function tools are supported")
            function = tool.get("function") or {}
            declaration: JSON = {"name": function.get("name")}
            if function.get("description"):
                declaration["description"] = function["description"]
            if function.get("parameters"):
                declaration["parameters"] = function["parameters"]
            declarations.append(declaration)
        body["tools"] = [{"functionDeclarations": declarations}]
        tool_config = _tool_config(request.get("tool_choice"))
        if tool_config is not None:
            body["toolConfig"] = tool_config
    return body


# --------------------------------------------------------------------------------------------
# Gemini answers → OpenAI
# --------------------------------------------------------------------------------------------


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def usage_from(metadata: Any) -> Usage:
    if not isinstance(metadata, dict):
        return Usage(0, 0)
    # Thinking tokens are billed as output; tool-use prompt tokens as input.
    return Usage(
        _int(metadata.get("promptTokenCount")) + _int(metadata.get("toolUsePromptTokenCount")),
        _int(metadata.get("candidatesTokenCount")) + _int(metadata.get("thoughtsTokenCount")),
    )


def finish_reason(reason: Any, has_tool_calls: bool) -> str | None:
    if not reason:
        return None
    mapped = FINISH_REASONS.get(reason, "stop")
    return "tool_calls" if has_tool_calls and mapped == "stop" else mapped


def _tool_call(function_call: JSON) -> JSON:
    return {
        "id": function_call.get("id") or tool_call_id(),
        "type": "function",
        "function": {
            "name": function_call.get("name"),
            "arguments": json_dumps(function_call.get("args") or {}).decode(),
        },
    }


def _split_parts(content: Any) -> tuple[list[str], list[JSON]]:
    texts: list[str] = []
    calls: list[JSON] = []
    parts = content.get("parts") if isinstance(content, dict) else None
    for part in parts or ():
        if part.get("thought"):
            continue  # thought summaries are not part of the answer
        if "text" in part:
            texts.append(part["text"])
        elif "functionCall" in part:
            calls.append(_tool_call(part["functionCall"]))
    return texts, calls


def translate_response(raw: JSON, model: str) -> Completion:
    """A Gemini `GenerateContentResponse` as an OpenAI chat completion."""
    choices: list[JSON] = []
    for position, candidate in enumerate(raw.get("candidates") or ()):
        texts, calls = _split_parts(candidate.get("content"))
        content = "".join(texts) if texts or not calls else None
        reason = finish_reason(candidate.get("finishReason"), bool(calls))
        choices.append(openai_choice(_int(candidate.get("index", position)), content, calls, reason))
    if not choices:
        # The prompt itself was blocked (`promptFeedback.blockReason`): no candidates at all.
        choices.append(openai_choice(0, None, [], "content_filter"))
    usage = usage_from(raw.get("usageMetadata"))
    body = openai_completion(
        id=raw.get("responseId") or completion_id(),
        created=now(),
        model=raw.get("modelVersion") or model,
        choices=choices,
        usage=usage,
    )
    return Completion(body=body, usage=usage)


def error_from_body(
    error: Any, secret: str = "", *, prefix: str = "gemini upstream stream failed"
) -> UpstreamError:
    error = error if isinstance(error, dict) else {}
    code = error.get("code")
    status = error.get("status")
    message = clip(redact(str(error.get("message") or "error"), secret))
    return error_for_status(
        code if isinstance(code, int) and 400 <= code < 600 else 502,
        f"{prefix}: {message}",
        provider=PROVIDER,
        error_type=status if isinstance(status, str) else None,
    )


class StreamTranslator:
    """Turns streamed `GenerateContentResponse` objects into OpenAI chunks.

    Gemini has no end-of-stream event: the stream is complete when every candidate has reported
    a `finishReason` (or the prompt was blocked). `finish()` then gives the usage chunk.
    """

    def __init__(self, model: str, candidates: int = 1, secret: str = "") -> None:
        self._model = model
        self._expected = max(1, candidates)
        self._secret = secret
        self._chunks: ChunkFactory | None = None
        self._started: set[int] = set()
        self._finished: set[int] = set()
        self._tool_counts: dict[int, int] = {}
        self._usage: Any = None

    @property
    def done(self) -> bool:
        return len(self._finished) >= self._expected

    @property
    def usage(self) -> Usage:
        return usage_from(self._usage)

    def feed(self, raw: JSON) -> list[JSON]:
        if "error" in raw:
            raise error_from_body(raw["error"], self._secret)
        if self._chunks is None:
            self._chunks = ChunkFactory(
                raw.get("responseId") or completion_id(), now(), raw.get("modelVersion") or self._model
            )
        factory = self._chunks
        if raw.get("usageMetadata"):
            self._usage = raw["usageMetadata"]  # cumulative; the last one counts
        out: list[JSON] = []
        candidates = raw.get("candidates") or ()
        if not candidates and (raw.get("promptFeedback") or {}).get("blockReason"):
            self._finished.update(range(self._expected))
            return [factory.delta({"role": "assistant", "content": None}, "content_filter")]
        for position, candidate in enumerate(candidates):
            index = _int(candidate.get("index", position))
            if index not in self._started:
                self._started.add(index)
                out.append(factory.delta({"role": "assistant", "content": ""}, index=index))
            texts, calls = _split_parts(candidate.get("content"))
            text = "".join(texts)
            if text:
                out.append(factory.delta({"content": text}, index=index))
            if calls:
                first = self._tool_counts.get(index, 0)
                self._tool_counts[index] = first + len(calls)
                indexed = [{"index": first + i, **call} for i, call in enumerate(calls)]
                out.append(factory.delta({"tool_calls": indexed}, index=index))
            reason = finish_reason(candidate.get("finishReason"), index in self._tool_counts)
            if reason:
                self._finished.add(index)
                out.append(factory.delta({}, reason, index=index))
        return out

    def finish(self) -> JSON:
        if self._chunks is None:
            self._chunks = ChunkFactory(completion_id(), now(), self._model)
        return self._chunks.usage(self.usage)


# --------------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _model_path(model: str) -> str:
    name = model if "/" in model else "models/" + model  # `tunedModels/...` passes as it is
    return "/".join(quote(segment, safe="-._~") for segment in name.split("/"))


class GeminiAdapter(HTTPAdapter):
    kind = PROVIDER

    def __init__(self, *, session: aiohttp.ClientSession, base_url: str | None = None) -> None:
        super().__init__(session=session)
        self._root = (base_url or DEFAULT_BASE_URL).rstrip("/").removesuffix("/v1beta") + "/v1beta/"
        self._models_url = self._root + "models"
        self._static_headers = {"content-type": "application/json", "accept": "application/json"}

    def _headers(self, api_key: str) -> dict[str, str]:
        return {**self._static_headers, "x-goog-api-key": api_key}

    def _classify(self, status: int, payload: Any) -> int:
        # Google answers a bad key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID.
        if status == 400 and isinstance(payload, dict):
            error = payload.get("error")
            details = error.get("details") if isinstance(error, dict) else None
            for detail in details or ():
                if isinstance(detail, dict) and detail.get("reason") in (
                    "API_KEY_INVALID",
                    "API_KEY_EXPIRED",
                ):
                    return 401
        return status

    def _retry_after(self, headers: Mapping[str, str], payload: Any) -> float | None:
        header = super()._retry_after(headers, payload)
        if header is not None or not isinstance(payload, dict):
            return header
        error = payload.get("error")
        for detail in (error.get("details") if isinstance(error, dict) else None) or ():
            delay = detail.get("retryDelay") if isinstance(detail, dict) else None
            if isinstance(delay, str) and delay.endswith("s"):
                try:
                    return max(0.0, float(delay[:-1]))
                except ValueError:
                    return None
        return None

    async def complete(self, request: dict[str, Any], *, api_key: str, model: str) -> Completion:
        body = build_request(request)
        raw = await self._post_json(self._root + _model_path(model) + ":generateContent", body, api_key)
        return translate_response(raw, model)

    async def stream(
        self, request: dict[str, Any], *, api_key: str, model: str
    ) -> AsyncIterator[dict[str, Any]]:
        body = build_request(request)
        n = request.get("n")
        translator = StreamTranslator(model, n if isinstance(n, int) else 1, api_key)
        url = self._root + _model_path(model) + ":streamGenerateContent?alt=sse"
        events = self._events(url, body, api_key)
        async with aclosing(events):
            async for event in events:
                data = self._decode_event(event.data)
                if not isinstance(data, dict):
                    raise self._invalid_json()
                for chunk in translator.feed(data):
                    yield chunk
        # The body ended; it is complete only if every candidate said why it stopped.
        if not translator.done:
            raise self._broken("ended before a finishReason")
        yield translator.finish()

    async def check_key(self, api_key: str) -> None:
        await self._get(self._models_url, api_key)
