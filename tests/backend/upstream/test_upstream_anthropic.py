"""Anthropic specifics: the Messages request built from an OpenAI one, tool calls both ways,
the answer and SSE events translated back (also from a transcript in Anthropic's documented
format), and error types."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from fakes import FakeUpstreams, scenarios
from quotra.upstream import UpstreamBadRequest, UpstreamRateLimited, UpstreamUnavailable, get_adapter
from quotra.upstream.anthropic import DEFAULT_MAX_TOKENS, StreamTranslator, build_request, translate_message
from quotra.upstream.base import Adapter
from upstream_helpers import chat, finish_reasons, text_of

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
def anthropic(fake_upstreams: FakeUpstreams, session: aiohttp.ClientSession) -> Adapter:
    return get_adapter("anthropic", session=session, base_url=fake_upstreams.anthropic)


async def test_complete__sends_a_messages_request_with_anthropic_headers(
    anthropic: Adapter, fake_upstreams: FakeUpstreams
) -> None:
    request = chat(
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
        temperature=1.7,
        top_p=0.5,
        stop="STOP",
        user="consumer-7",
    )

    completion = await anthropic.complete(request, api_key=fake_upstreams.api_key, model="claude-sonnet-4-5")

    seen = fake_upstreams.recorder.last_request("anthropic")
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == fake_upstreams.api_key
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in seen.headers
    assert seen.body == {
        "model": "claude-sonnet-4-5",
        "system": "Be brief.\n\nBe kind.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
            {"role": "user", "content": [{"type": "text", "text": "How are you?"}]},
        ],
        "max_tokens": DEFAULT_MAX_TOKENS,
        "temperature": 1.0,  # OpenAI allows up to 2, Anthropic up to 1
        "top_p": 0.5,
        "stop_sequences": ["STOP"],
        "metadata": {"user_id": "consumer-7"},
    }
    assert completion.body["choices"][0]["message"]["content"] == "Echo: How are you?"
    # usage: one token per word in the fake; system + every message count as input
    assert completion.usage.prompt_tokens == 2 + 2 + 1 + 1 + 3
    assert completion.usage.completion_tokens == 4
    assert completion.body["model"] == "claude-sonnet-4-5"


async def test_complete__stop_sequence_hit__finish_stop(
    anthropic: Adapter, fake_upstreams: FakeUpstreams
) -> None:
    completion = await anthropic.complete(
        chat(stop=["there"]), api_key=fake_upstreams.api_key, model="claude"
    )

    assert completion.body["choices"][0]["finish_reason"] == "stop"
    assert completion.body["choices"][0]["message"]["content"] == "Echo: Hello "


async def test_tool_call__complete__tool_calls_with_json_arguments(
    anthropic: Adapter, fake_upstreams: FakeUpstreams
) -> None:
    request = chat(tools=[WEATHER_TOOL], tool_choice="required", parallel_tool_calls=False)

    completion = await anthropic.complete(request, api_key=fake_upstreams.api_key, model=scenarios.TOOL)

    sent = fake_upstreams.recorder.last_request("anthropic").body
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
        }
    ]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    choice = completion.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["id"] == "toolu_01Fake" and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


async def test_tool_call__stream__tool_call_deltas_carry_the_partial_json(
    anthropic: Adapter, fake_upstreams: FakeUpstreams
) -> None:
    request = chat(tools=[WEATHER_TOOL])

    chunks = [
        c async for c in anthropic.stream(request, api_key=fake_upstreams.api_key, model=scenarios.TOOL)
    ]

    calls = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0] == {
        "index": 0,
        "id": "toolu_01Fake",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert json.loads("".join(d["function"]["arguments"] for d in calls)) == {"city": "Paris"}
    assert all(d["index"] == 0 for d in calls)
    assert finish_reasons(chunks) == ["tool_calls"]


async def test_stream__usage_from_message_start_and_message_delta(
    anthropic: Adapter, fake_upstreams: FakeUpstreams
) -> None:
    chunks = [c async for c in anthropic.stream(chat(), api_key=fake_upstreams.api_key, model="claude")]

    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13}
    assert fake_upstreams.recorder.last_request("anthropic").body["stream"] is True


async def test_529_overloaded__unavailable(anthropic: Adapter, fake_upstreams: FakeUpstreams) -> None:
    with pytest.raises(UpstreamUnavailable) as caught:
        await anthropic.complete(chat(), api_key=fake_upstreams.api_key, model=scenarios.error_model(529))

    assert caught.value.status_code == 529
    assert caught.value.error_type == "overloaded_error"
    assert "Overloaded" in str(caught.value)


async def test_n_above_one__bad_request_before_any_call(
    anthropic: Adapter, fake_upstreams: FakeUpstreams
) -> None:
    with pytest.raises(UpstreamBadRequest, match="n > 1"):
        await anthropic.complete(chat(n=2), api_key=fake_upstreams.api_key, model="claude")

    assert fake_upstreams.recorder.requests == []


# --------------------------------------------------------------------------------------------
# Pure translation
# --------------------------------------------------------------------------------------------


def test_build_request__tool_results_images_and_runs_of_roles() -> None:
    request = chat(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "look", "arguments": '{"zoom": 2}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "look", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "a hat"}]},
        max_tokens=50,
    )

    body = build_request(request, "claude", stream=True)

    assert body["max_tokens"] == 50 and body["stream"] is True
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "call_1", "name": "look", "input": {"zoom": 2}},
                {"type": "tool_use", "id": "call_2", "name": "look", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [  # consecutive tool results become one user turn
                {"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "a hat"},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "input_audio"),
        ({"role": "function", "content": "x"}, "role 'function'"),
    ],
)
def test_build_request__unsupported_input__bad_request(message: dict[str, Any], problem: str) -> None:
    with pytest.raises(UpstreamBadRequest, match=problem):
        build_request(chat(message), "claude", stream=False)


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_translate_message__stop_reasons(stop_reason: str, finish: str) -> None:
    raw = {
        "id": "msg_1",
        "model": "claude",
        "content": [{"type": "text", "text": "x"}],
        "stop_reason": stop_reason,
        "usage": {},
    }

    assert translate_message(raw, "claude").body["choices"][0]["finish_reason"] == finish


def test_translate_message__cached_prompt_tokens_count_as_prompt_and_thinking_is_dropped() -> None:
    raw = {
        "id": "msg_1",
        "model": "claude-opus-4",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "42"},
        ],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": 1000,
            "output_tokens": 5,
        },
    }

    completion = translate_message(raw, "claude-opus-4")

    assert completion.body["choices"][0]["message"]["content"] == "42"
    assert completion.usage.prompt_tokens == 1110 and completion.usage.completion_tokens == 5


# The example stream from Anthropic's streaming documentation, as decoded `data:` payloads.
DOCUMENTED_STREAM = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-opus-4-1-20250805",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    },
    {"type": "message_stop"},
]


def test_stream_translator__documented_stream__openai_chunks() -> None:
    translator = StreamTranslator("claude")

    chunks = [chunk for event in DOCUMENTED_STREAM for chunk in translator.feed(event)]

    assert translator.done
    assert {c["id"] for c in chunks} == {"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"}
    assert {c["model"] for c in chunks} == {"claude-opus-4-1-20250805"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert text_of(chunks) == "Hello!"
    assert finish_reasons(chunks) == ["stop"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40}


@pytest.mark.parametrize(
    ("error_type", "error_class", "status"),
    [
        ("overloaded_error", UpstreamUnavailable, 529),
        ("rate_limit_error", UpstreamRateLimited, 429),
        ("invalid_request_error", UpstreamBadRequest, 400),
    ],
)
def test_stream_translator__error_event__mapped_by_error_type(
    error_type: str, error_class: type, status: int
) -> None:
    translator = StreamTranslator("claude")

    with pytest.raises(error_class) as caught:
        translator.feed({"type": "error", "error": {"type": error_type, "message": "nope"}})

    assert caught.value.status_code == status
