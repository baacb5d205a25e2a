"""The contract pieces: exceptions, usage, SSE line splitting and decoding, status mapping,
redaction, get_adapter."""

from __future__ import annotations

import email.utils
import time

import aiohttp
import pytest
from quotra.upstream import (
    UPSTREAM_KINDS,
    Adapter,
    AnthropicAdapter,
    GeminiAdapter,
    OpenAIAdapter,
    SandboxAdapter,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
    Usage,
    get_adapter,
)
from quotra.upstream._http import (
    LineSplitter,
    SSEDecoder,
    SSEEvent,
    error_for_status,
    parse_retry_after,
    redact,
)
from quotra.upstream.openai import api_root

# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------


def test_usage__total_is_the_sum_and_openai_shape_matches() -> None:
    usage = Usage(prompt_tokens=12, completion_tokens=30)

    assert usage.total_tokens == 42
    assert usage.to_openai() == {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
    with pytest.raises(AttributeError):
        usage.prompt_tokens = 1  # type: ignore[misc]


def test_errors__hierarchy_defaults_and_repr() -> None:
    limited = UpstreamRateLimited("slow down", retry_after=2.5)

    assert isinstance(limited, UpstreamError)
    assert (limited.status_code, limited.retryable, limited.retry_after) == (429, True, 2.5)
    assert (UpstreamAuthError("x").status_code, UpstreamAuthError("x").retryable) == (401, False)
    assert (UpstreamUnavailable("x").status_code, UpstreamUnavailable("x").retryable) == (502, True)
    assert (UpstreamBadRequest("x").status_code, UpstreamBadRequest("x").retryable) == (400, False)
    assert str(limited) == limited.message == "slow down"
    assert repr(limited) == "UpstreamRateLimited(status_code=429, message='slow down')"


@pytest.mark.parametrize(
    ("status", "error_class", "retryable"),
    [
        (400, UpstreamBadRequest, False),
        (401, UpstreamAuthError, False),
        (402, UpstreamUnavailable, False),
        (403, UpstreamAuthError, False),
        (404, UpstreamBadRequest, False),
        (408, UpstreamUnavailable, True),
        (413, UpstreamBadRequest, False),
        (422, UpstreamBadRequest, False),
        (429, UpstreamRateLimited, True),
        (500, UpstreamUnavailable, True),
        (502, UpstreamUnavailable, True),
        (503, UpstreamUnavailable, True),
        (529, UpstreamUnavailable, True),
    ],
)
def test_error_for_status__maps_each_status(
    status: int, error_class: type[UpstreamError], retryable: bool
) -> None:
    error = error_for_status(status, "m", provider="openai")

    assert type(error) is error_class
    assert (error.status_code, error.retryable, error.provider) == (status, retryable, "openai")


def test_error_for_status__openai_insufficient_quota__not_retryable() -> None:
    error = error_for_status(429, "m", provider="openai", error_type="insufficient_quota")

    assert isinstance(error, UpstreamRateLimited) and error.retryable is False


# --------------------------------------------------------------------------------------------
# SSE
# --------------------------------------------------------------------------------------------


def decode(text: str) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = [decoder.feed(line) for line in text.splitlines()]
    return [e for e in events if e is not None]


def test_sse__data_lines__one_event_per_blank_line() -> None:
    assert decode('data: {"a":1}\n\ndata: [DONE]\n\n') == [
        SSEEvent("message", '{"a":1}'),
        SSEEvent("message", "[DONE]"),
    ]


def test_sse__multi_line_data__joined_with_newlines() -> None:
    assert decode('data: {\ndata:  "a": 1\ndata: }\n\n') == [SSEEvent("message", '{\n "a": 1\n}')]


def test_sse__comments_and_unknown_fields__ignored() -> None:
    text = ": keep-alive\n\nid: 7\nretry: 100\nfoo: bar\ndata: x\n\n: bye\n\n"

    assert decode(text) == [SSEEvent("message", "x")]


def test_sse__event_field__names_the_event_and_resets_after_dispatch() -> None:
    text = "event: message_start\ndata: 1\n\ndata: 2\n\n"

    assert decode(text) == [SSEEvent("message_start", "1"), SSEEvent("message", "2")]


def test_sse__no_space_after_colon_and_crlf__still_parsed() -> None:
    assert decode("data:x\r\n\r\nevent:e\r\ndata:y\r\n\r\n") == [SSEEvent("message", "x"), SSEEvent("e", "y")]


def test_sse__event_without_data__dropped_and_trailing_partial_event__never_dispatched() -> None:
    assert decode("event: ping\n\ndata: cut-off") == []


def split(*chunks: bytes) -> list[str]:
    splitter = LineSplitter()
    return [line for chunk in chunks for line in splitter.feed(chunk)]


def test_lines__lf_crlf_and_cr__each_ends_a_line() -> None:
    assert split(b"a\nb\r\nc\rd\n\r\n") == ["a", "b", "c", "d", ""]


def test_lines__crlf_split_across_chunks__one_line_end() -> None:
    assert split(b"a\r", b"\nb\r", b"\r\n") == ["a", "b", ""]


def test_lines__unended_last_line__held_back() -> None:
    splitter = LineSplitter()

    assert splitter.feed(b"data: 1\n\ndata: cut") == ["data: 1", ""]
    assert splitter.feed(b"-off") == []
    assert splitter.feed(b"\n") == ["data: cut-off"]


def test_lines__line_over_128_kib_cut_inside_characters__decoded_whole() -> None:
    line = "data: " + "é€😀" * 15_000
    raw = line.encode()
    cuts = [raw.index("€".encode()) + 1, raw.index("😀".encode()) + 2, len(raw) - 1]
    chunks = [raw[i:j] for i, j in zip([0, *cuts], [*cuts, len(raw)], strict=True)]

    assert split(*chunks, b"\n") == [line]


# --------------------------------------------------------------------------------------------
# Redaction and retry-after
# --------------------------------------------------------------------------------------------

KEY = "sk-live-abcdefghijklmnopqrstuvwxyz0123456789"


def test_redact__whole_key__replaced() -> None:
    assert redact(f"bad key {KEY}!", KEY) == "bad key [redacted]!"


def test_redact__long_fragment_of_the_key__replaced() -> None:
    leaked = redact(f"key sk-live-abcdefghij****6789 refused, saw {KEY[5:30]}", KEY)

    assert KEY[5:30] not in leaked
    assert "abcdefghij" not in leaked


def test_redact__unrelated_text__unchanged() -> None:
    assert redact("Rate limit reached", KEY) == "Rate limit reached"
    assert redact("anything", "") == "anything"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({}, None),
        ({"retry-after": "soon"}, None),
    ],
)
def test_parse_retry_after__seconds_and_milliseconds(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after__http_date__seconds_until_then() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)

    value = parse_retry_after({"retry-after": when})

    assert value is not None and 27 <= value <= 30


# --------------------------------------------------------------------------------------------
# get_adapter
# --------------------------------------------------------------------------------------------


async def test_get_adapter__every_kind__an_adapter_of_that_kind(session: aiohttp.ClientSession) -> None:
    adapters = {kind: get_adapter(kind, session=session, base_url="http://h:1/v1") for kind in UPSTREAM_KINDS}

    assert UPSTREAM_KINDS == ("openai", "anthropic", "gemini", "openai-compatible", "sandbox")
    assert {kind: a.kind for kind, a in adapters.items()} == {k: k for k in UPSTREAM_KINDS}
    assert isinstance(adapters["openai"], OpenAIAdapter)
    assert isinstance(adapters["openai-compatible"], OpenAIAdapter)
    assert isinstance(adapters["anthropic"], AnthropicAdapter)
    assert isinstance(adapters["gemini"], GeminiAdapter)
    assert isinstance(adapters["sandbox"], SandboxAdapter)
    assert all(isinstance(a, Adapter) for a in adapters.values())


async def test_get_adapter__unknown_kind__value_error(session: aiohttp.ClientSession) -> None:
    with pytest.raises(ValueError, match="unknown upstream kind 'mistral'"):
        get_adapter("mistral", session=session)


async def test_get_adapter__openai_compatible_without_base_url__value_error(
    session: aiohttp.ClientSession,
) -> None:
    with pytest.raises(ValueError, match="base_url"):
        get_adapter("openai-compatible", session=session)


@pytest.mark.parametrize(
    ("base", "root"),
    [
        ("https://api.openai.com", "https://api.openai.com/v1"),
        ("https://api.openai.com/", "https://api.openai.com/v1"),
        ("http://localhost:8000/v1", "http://localhost:8000/v1"),
        ("https://openrouter.ai/api/v1/", "https://openrouter.ai/api/v1"),
        (
            "https://generativelanguage.googleapis.com/v1beta/openai",
            "https://generativelanguage.googleapis.com/v1beta/openai",
        ),
    ],
)
def test_api_root__bare_host_gets_v1_and_a_path_is_the_root(base: str, root: str) -> None:
    assert api_root(base) == root
