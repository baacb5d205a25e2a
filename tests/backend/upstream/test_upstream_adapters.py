"""Behaviour every HTTP adapter shares, each against its provider's fake over real HTTP:
translation to OpenAI completions and chunks, usage, finish reasons, error mapping, timeouts,
refused addresses, broken streams, early close, key checks and key hygiene."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
from fakes import scenarios
from quotra.netguard import NetGuard
from quotra.upstream import (
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from upstream_helpers import Harness, assert_key_hidden, chat, finish_reasons, text_of, upstream_session

LONG_USER = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
WRONG_KEY = "sk-wrong-key-0123456789abcdefghijklmnopqrstuv"


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


async def test_complete__text_reply__openai_completion_with_usage(harness: Harness) -> None:
    completion = await harness.complete()

    body = completion.body
    assert body["object"] == "chat.completion"
    assert isinstance(body["id"], str) and body["id"]
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == harness.expected_text()
    assert choice["finish_reason"] == "stop"
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    assert body["usage"] == completion.usage.to_openai()
    assert body["usage"]["total_tokens"] == completion.usage.total_tokens


async def test_stream__text_reply__chunks_join_to_the_same_answer_and_usage_comes_last(
    harness: Harness,
) -> None:
    completion = await harness.complete()
    chunks = await harness.collect()

    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) >= 2
    assert text_of(chunks) == harness.expected_text()
    assert finish_reasons(chunks) == ["stop"]
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"] == completion.usage.to_openai()
    assert all(not c.get("usage") for c in chunks[:-1])


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_max_tokens__reached__finish_reason_length(harness: Harness, streaming: bool) -> None:
    request = chat(max_tokens=2)
    if streaming:
        chunks = await harness.collect(request)
        text, reasons, usage = text_of(chunks), finish_reasons(chunks), chunks[-1]["usage"]
    else:
        completion = await harness.complete(request)
        choice = completion.body["choices"][0]
        text, reasons, usage = (
            choice["message"]["content"],
            [choice["finish_reason"]],
            completion.body["usage"],
        )

    assert reasons == ["length"]
    assert usage["completion_tokens"] == 2
    assert harness.expected_text().startswith(text) and text != harness.expected_text()


async def test_max_completion_tokens__is_honoured_like_max_tokens(harness: Harness) -> None:
    completion = await harness.complete(chat(max_completion_tokens=2))

    assert completion.body["choices"][0]["finish_reason"] == "length"
    assert completion.usage.completion_tokens == 2


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_stop_sequence__cuts_the_reply_before_it(harness: Harness, streaming: bool) -> None:
    request = chat(stop=["how", "never-there"])
    if streaming:
        chunks = await harness.collect(request)
        text, reasons = text_of(chunks), finish_reasons(chunks)
    else:
        choice = (await harness.complete(request)).body["choices"][0]
        text, reasons = choice["message"]["content"], [choice["finish_reason"]]

    expected = harness.expected_text()
    assert text == expected[: expected.index("how")]
    assert reasons == ["stop"]


async def test_multi_turn__answers_the_last_user_message(harness: Harness) -> None:
    request = chat(
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Second "}, {"type": "text", "text": "question"}],
        },
    )

    completion = await harness.complete(request)

    assert completion.body["choices"][0]["message"]["content"] == harness.expected_text("Second question")


async def test_complete__upstream_model_is_the_listing_model(harness: Harness) -> None:
    await harness.complete(model=scenarios.MODEL)

    seen = harness.fakes.recorder.last_request(harness.provider)
    assert scenarios.MODEL in seen.path or seen.body.get("model") == scenarios.MODEL


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

ERRORS = [
    (400, UpstreamBadRequest, False),
    (404, UpstreamBadRequest, False),
    (429, UpstreamRateLimited, True),
    (500, UpstreamUnavailable, True),
]


@pytest.mark.parametrize(("status", "error_class", "retryable"), ERRORS)
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_upstream_error_status__maps_to_its_exception(
    harness: Harness, status: int, error_class: type[UpstreamError], retryable: bool, streaming: bool
) -> None:
    with pytest.raises(error_class) as caught:
        if streaming:
            await harness.collect(model=scenarios.error_model(status))
        else:
            await harness.complete(model=scenarios.error_model(status))

    error = caught.value
    assert error.status_code == status
    assert error.retryable is retryable
    assert error.provider == harness.kind
    assert str(status) in str(error)
    assert len(error.message) > len(f"{harness.kind} upstream answered {status}: ")  # upstream's words kept
    if isinstance(error, UpstreamRateLimited):
        assert error.retry_after == scenarios.RETRY_AFTER_SECONDS


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_wrong_key__auth_error(harness: Harness, streaming: bool) -> None:
    with pytest.raises(UpstreamAuthError) as caught:
        if streaming:
            await harness.collect(key=WRONG_KEY)
        else:
            await harness.complete(key=WRONG_KEY)

    assert caught.value.retryable is False
    assert caught.value.status_code in (400, 401)  # Gemini says 400 API_KEY_INVALID
    assert_key_hidden(caught.value, WRONG_KEY)


async def test_stream_error__raised_at_first_next_before_any_chunk(harness: Harness) -> None:
    stream = harness.adapter().stream(chat(), api_key=harness.key, model=scenarios.error_model(429))

    with pytest.raises(UpstreamRateLimited):
        await anext(stream)


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_upstream_quotes_the_key__never_reaches_the_exception(
    harness: Harness, streaming: bool
) -> None:
    with pytest.raises(UpstreamAuthError) as caught:
        if streaming:
            await harness.collect(model=scenarios.ECHO_KEY)
        else:
            await harness.complete(model=scenarios.ECHO_KEY)

    assert "[redacted]" in str(caught.value)
    assert_key_hidden(caught.value, harness.key)


# --------------------------------------------------------------------------------------------
# Transport failures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_slow_upstream__timeout__unavailable(harness: Harness, streaming: bool) -> None:
    started = time.monotonic()

    with pytest.raises(UpstreamUnavailable) as caught:
        async with upstream_session(timeout=0.15) as session:
            adapter = harness.adapter(session=session)
            if streaming:
                [c async for c in adapter.stream(chat(), api_key=harness.key, model=scenarios.SLOW)]
            else:
                await adapter.complete(chat(), api_key=harness.key, model=scenarios.SLOW)

    assert time.monotonic() - started < scenarios.SLOW_SECONDS
    assert caught.value.status_code == 504
    assert caught.value.retryable is True
    assert "timed out" in str(caught.value)
    assert_key_hidden(caught.value, harness.key)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_nothing_listening__connection_error__unavailable(harness: Harness, streaming: bool) -> None:
    base = f"http://127.0.0.1:{_closed_port()}" + ("/v1" if harness.kind == "openai-compatible" else "")
    adapter = harness.adapter(base_url=base)

    with pytest.raises(UpstreamUnavailable) as caught:
        if streaming:
            [c async for c in adapter.stream(chat(), api_key=harness.key, model=scenarios.MODEL)]
        else:
            await adapter.complete(chat(), api_key=harness.key, model=scenarios.MODEL)

    assert caught.value.status_code == 502
    assert "connect" in str(caught.value)
    assert_key_hidden(caught.value, harness.key)


def _by_name(harness: Harness) -> str:
    """The fake's base URL with `localhost` for its loopback address: a name to resolve."""
    return harness.fakes.base_urls[harness.kind].replace("127.0.0.1", "localhost")


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_name_resolving_to_loopback__private_addresses_refused__unavailable_not_retryable(
    harness: Harness, streaming: bool
) -> None:
    # The listing's check passed when it was saved; the name now resolves to a loopback address.
    async with upstream_session(guard=NetGuard(allow_private=False)) as session:
        adapter = harness.adapter(session=session, base_url=_by_name(harness))
        with pytest.raises(UpstreamUnavailable) as caught:
            if streaming:
                [c async for c in adapter.stream(chat(), api_key=harness.key, model=scenarios.MODEL)]
            else:
                await adapter.complete(chat(), api_key=harness.key, model=scenarios.MODEL)

    assert caught.value.retryable is False
    assert "address refused: base_url host localhost resolves to a private" in str(caught.value)
    assert_key_hidden(caught.value, harness.key)
    with pytest.raises(LookupError):
        harness.fakes.recorder.last_request(harness.provider)  # nothing was sent


async def test_name_resolving_to_loopback__private_addresses_allowed__answered(harness: Harness) -> None:
    async with upstream_session(guard=NetGuard(allow_private=True)) as session:
        adapter = harness.adapter(session=session, base_url=_by_name(harness))

        completion = await adapter.complete(chat(), api_key=harness.key, model=scenarios.MODEL)

    assert completion.body["choices"][0]["message"]["content"] == harness.expected_text()


async def test_complete__body_cut_off__unavailable(harness: Harness) -> None:
    with pytest.raises(UpstreamUnavailable) as caught:
        await harness.complete(model=scenarios.BREAK)

    assert_key_hidden(caught.value, harness.key)


async def test_stream__connection_drops_midway__unavailable_from_the_iterator(harness: Harness) -> None:
    received: list[dict[str, Any]] = []
    request = chat({"role": "user", "content": LONG_USER})
    stream = harness.adapter().stream(request, api_key=harness.key, model=scenarios.BREAK)

    with pytest.raises(UpstreamUnavailable) as caught:
        async for chunk in stream:
            received.append(chunk)

    assert received, "the break comes after some chunks were delivered"
    assert all(c["choices"] for c in received)  # no usage chunk: the answer never completed
    assert caught.value.retryable is True
    assert_key_hidden(caught.value, harness.key)


async def test_stream__body_ends_without_end_marker__unavailable(harness: Harness) -> None:
    request = chat({"role": "user", "content": LONG_USER})

    with pytest.raises(UpstreamUnavailable, match="stream ended before"):
        await harness.collect(request, model=scenarios.TRUNCATE)


async def test_stream__error_event_midway__unavailable(harness: Harness) -> None:
    with pytest.raises(UpstreamUnavailable, match="stream failed"):
        await harness.collect(chat({"role": "user", "content": LONG_USER}), model=scenarios.STREAM_ERROR)


# --------------------------------------------------------------------------------------------
# Leaving a stream early
# --------------------------------------------------------------------------------------------


async def test_stream__consumer_closes_early__upstream_request_is_disconnected(harness: Harness) -> None:
    stream = harness.adapter().stream(
        chat({"role": "user", "content": LONG_USER}), api_key=harness.key, model=scenarios.DRIP
    )
    await anext(stream)
    await anext(stream)

    await stream.aclose()  # type: ignore[attr-defined]  # adapters' streams are async generators

    close = await asyncio.to_thread(harness.fakes.recorder.wait_for_close, harness.provider, scenarios.DRIP)
    assert close is not None and close.completed is False


async def test_stream__consuming_task_cancelled__upstream_request_is_disconnected(harness: Harness) -> None:
    first = asyncio.Event()

    async def consume() -> None:
        request = chat({"role": "user", "content": LONG_USER})
        async for _ in harness.adapter().stream(request, api_key=harness.key, model=scenarios.DRIP):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    close = await asyncio.to_thread(harness.fakes.recorder.wait_for_close, harness.provider, scenarios.DRIP)
    assert close is not None and close.completed is False


async def test_stream__read_to_the_end__upstream_sees_a_completed_response(harness: Harness) -> None:
    chunks = await harness.collect(model=scenarios.DRIP)

    assert chunks[-1]["usage"]["completion_tokens"] > 0
    close = await asyncio.to_thread(harness.fakes.recorder.wait_for_close, harness.provider, scenarios.DRIP)
    assert close is not None and close.completed is True


async def test_stream__connection_is_reused_after_a_complete_stream(harness: Harness) -> None:
    # The adapter reads the body to its end after the last event, so the pooled connection
    # serves the next request instead of being torn down.
    peers = []
    for _ in range(2):
        [c async for c in harness.adapter().stream(chat(), api_key=harness.key, model=scenarios.MODEL)]
        peers.append(harness.fakes.recorder.last_request(harness.provider).client)

    assert peers[0] is not None and peers[0] == peers[1]


# --------------------------------------------------------------------------------------------
# Key checks
# --------------------------------------------------------------------------------------------


async def test_check_key__accepted_key__returns(harness: Harness) -> None:
    await harness.adapter().check_key(harness.key)

    seen = harness.fakes.recorder.last_request(harness.provider)
    assert seen.method == "GET" and seen.path.endswith("/models")


async def test_check_key__refused_key__auth_error(harness: Harness) -> None:
    with pytest.raises(UpstreamAuthError) as caught:
        await harness.adapter().check_key(WRONG_KEY)

    assert_key_hidden(caught.value, WRONG_KEY)


async def test_check_key__upstream_down__unavailable_not_auth(harness: Harness) -> None:
    base = f"http://127.0.0.1:{_closed_port()}"

    with pytest.raises(UpstreamUnavailable):
        await harness.adapter(base_url=base).check_key(harness.key)
