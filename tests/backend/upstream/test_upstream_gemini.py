"""Gemini specifics: URLs and key header, the GenerateContentRequest built from an OpenAI one,
function calls both ways, finish reasons, usage, and Google's error shapes."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from fakes import FakeUpstreams, scenarios
from quotra.upstream import (
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamRateLimited,
    UpstreamUnavailable,
    get_adapter,
)
from quotra.upstream.base import Adapter
from quotra.upstream.gemini import StreamTranslator, build_request, translate_response
from upstream_helpers import chat, finish_reasons, text_of

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture
def gemini(fake_upstreams: FakeUpstreams, session: aiohttp.ClientSession) -> Adapter:
    return get_adapter("gemini", session=session, base_url=fake_upstreams.gemini)


async def test_complete__generate_content_request_and_key_header(
    gemini: Adapter, fake_upstreams: FakeUpstreams
) -> None:
    request = chat(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
        max_tokens=100,
        temperature=0.3,
        top_p=0.8,
        stop=["END"],
    )

    completion = await gemini.complete(request, api_key=fake_upstreams.api_key, model="gemini-2.5-flash")

    seen = fake_upstreams.recorder.last_request("gemini")
    assert seen.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert seen.query == ""  # the key travels in a header, never in the URL
    assert seen.headers["x-goog-api-key"] == fake_upstreams.api_key
    assert seen.body == {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Hello!"}]},
            {"role": "user", "parts": [{"text": "How are you?"}]},
        ],
        "generationConfig": {
            "maxOutputTokens": 100,
            "temperature": 0.3,
            "topP": 0.8,
            "stopSequences": ["END"],
        },
    }
    assert completion.body["choices"][0]["message"]["content"] == "Echo: How are you?"
    assert completion.body["choices"][0]["finish_reason"] == "stop"
    assert completion.body["model"] == "gemini-2.5-flash-001"  # modelVersion
    assert completion.usage.prompt_tokens == 2 + 1 + 1 + 3 and completion.usage.completion_tokens == 4


async def test_stream__alt_sse_url_crlf_frames_and_usage_from_the_last_event(
    gemini: Adapter, fake_upstreams: FakeUpstreams
) -> None:
    chunks = [
        c async for c in gemini.stream(chat(), api_key=fake_upstreams.api_key, model="models/gemini-2.5-pro")
    ]

    seen = fake_upstreams.recorder.last_request("gemini")
    assert seen.path == "/v1beta/models/gemini-2.5-pro:streamGenerateContent" and seen.query == "alt=sse"
    assert text_of(chunks) == "Echo: Hello there, how are you today?"
    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13}


async def test_tool_call__complete_and_stream__tool_calls(
    gemini: Adapter, fake_upstreams: FakeUpstreams
) -> None:
    request = chat(
        tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )

    completion = await gemini.complete(request, api_key=fake_upstreams.api_key, model=scenarios.TOOL)
    chunks = [c async for c in gemini.stream(request, api_key=fake_upstreams.api_key, model=scenarios.TOOL)]

    sent = fake_upstreams.recorder.last_request("gemini").body
    assert sent["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": WEATHER_TOOL["function"]["parameters"],
                }
            ]
        }
    ]  # type: ignore[index]
    assert sent["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }
    choice = completion.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    [streamed] = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert streamed["index"] == 0 and json.loads(streamed["function"]["arguments"]) == {"city": "Paris"}
    assert finish_reasons(chunks) == ["tool_calls"]


async def test_bad_key__google_400_api_key_invalid__auth_error(gemini: Adapter) -> None:
    with pytest.raises(UpstreamAuthError) as caught:
        await gemini.complete(chat(), api_key="AIzaSy-wrong-key-000000000000", model="gemini")

    assert caught.value.status_code == 400
    assert caught.value.error_type == "INVALID_ARGUMENT"
    assert "API key not valid" in str(caught.value)


async def test_429__retry_delay_from_retry_info(gemini: Adapter, fake_upstreams: FakeUpstreams) -> None:
    with pytest.raises(UpstreamRateLimited) as caught:
        await gemini.complete(chat(), api_key=fake_upstreams.api_key, model=scenarios.error_model(429))

    assert caught.value.retry_after == scenarios.RETRY_AFTER_SECONDS
    assert caught.value.error_type == "RESOURCE_EXHAUSTED"


async def test_503__unavailable(gemini: Adapter, fake_upstreams: FakeUpstreams) -> None:
    with pytest.raises(UpstreamUnavailable, match="overloaded"):
        await gemini.complete(chat(), api_key=fake_upstreams.api_key, model=scenarios.error_model(503))


async def test_openai_only_field__never_sent_to_google(
    gemini: Adapter, fake_upstreams: FakeUpstreams
) -> None:
    # The fake rejects unknown fields the way Google does; these must be translated or dropped.
    request = chat(
        max_completion_tokens=5, n=1, user="u", logprobs=False, response_format={"type": "json_object"}
    )

    completion = await gemini.complete(request, api_key=fake_upstreams.api_key, model="gemini")

    assert completion.body["choices"][0]["finish_reason"] == "length"
    config = fake_upstreams.recorder.last_request("gemini").body["generationConfig"]
    assert config == {"maxOutputTokens": 5, "responseMimeType": "application/json"}


# --------------------------------------------------------------------------------------------
# Pure translation
# --------------------------------------------------------------------------------------------


def test_build_request__function_responses_are_named_after_their_call() -> None:
    request = chat(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather?"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": -3}'},
        {"role": "tool", "tool_call_id": "unknown", "name": "legacy", "content": "plain text"},
    )

    body = build_request(request)

    assert body["contents"] == [
        {
            "role": "user",
            "parts": [{"text": "Weather?"}, {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/"}}],
        },
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}]},
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp": -3}}},
                {"functionResponse": {"name": "legacy", "response": {"content": "plain text"}}},
            ],
        },
    ]


def test_build_request__unsupported_part__bad_request() -> None:
    with pytest.raises(UpstreamBadRequest, match="'file'"):
        build_request(chat({"role": "user", "content": [{"type": "file", "file": {}}]}))


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("OTHER", "stop"),
    ],
)
def test_translate_response__finish_reasons(reason: str, finish: str) -> None:
    raw = {"candidates": [{"content": {"parts": [{"text": "x"}], "role": "model"}, "finishReason": reason}]}

    assert translate_response(raw, "gemini").body["choices"][0]["finish_reason"] == finish


def test_translate_response__blocked_prompt__content_filter_without_content() -> None:
    raw = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
    }

    completion = translate_response(raw, "gemini")

    choice = completion.body["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] is None
    assert completion.usage.prompt_tokens == 9 and completion.usage.completion_tokens == 0


def test_translate_response__thinking_tokens_billed_as_completion_and_thoughts_hidden() -> None:
    raw = {
        "candidates": [
            {
                "content": {
                    "parts": [{"text": "pondering", "thought": True}, {"text": "42"}],
                    "role": "model",
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 4,
            "candidatesTokenCount": 1,
            "thoughtsTokenCount": 30,
            "totalTokenCount": 35,
        },
    }

    completion = translate_response(raw, "gemini")

    assert completion.body["choices"][0]["message"]["content"] == "42"
    assert completion.usage.completion_tokens == 31


def test_stream_translator__in_stream_error__raised_with_its_status() -> None:
    translator = StreamTranslator("gemini")
    translator.feed({"candidates": [{"content": {"parts": [{"text": "a"}]}}]})

    with pytest.raises(UpstreamRateLimited):
        translator.feed({"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}})


def test_stream_translator__two_candidates__done_only_when_both_finish() -> None:
    translator = StreamTranslator("gemini", candidates=2)

    first: list[dict[str, Any]] = translator.feed(
        {"candidates": [{"index": 0, "content": {"parts": [{"text": "a"}]}, "finishReason": "STOP"}]}
    )
    assert not translator.done
    translator.feed(
        {"candidates": [{"index": 1, "content": {"parts": [{"text": "b"}]}, "finishReason": "STOP"}]}
    )

    assert translator.done
    assert [c["choices"][0]["index"] for c in first] == [0, 0, 0]
