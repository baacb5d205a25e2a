"""The sandbox: deterministic answers with no network, in all three synthesized wire formats."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace

import aiohttp
import pytest
from quotra.upstream import (
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamRateLimited,
    UpstreamUnavailable,
    get_adapter,
)
from quotra.upstream.base import Adapter
from upstream_helpers import chat, finish_reasons, text_of

SHAPES = ["sandbox-1", "claude-sandbox", "gemini-sandbox"]


async def no_network(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestStartParams
) -> None:
    raise AssertionError(f"the sandbox made a request to {params.url}")


@pytest.fixture
async def sandbox() -> AsyncIterator[Adapter]:
    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(no_network)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        yield get_adapter("sandbox", session=session, base_url="http://never.test")


@pytest.mark.parametrize("model", SHAPES)
async def test_complete__echoes_a_summary_with_usage(sandbox: Adapter, model: str) -> None:
    completion = await sandbox.complete(chat(), api_key="", model=model)

    choice = completion.body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Sandbox reply to: Hello there, how are you today?",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"
    assert completion.body["object"] == "chat.completion" and completion.body["model"] == model
    # ~4 characters per token: 31-character prompt, 49-character reply
    assert completion.usage.prompt_tokens == 8 and completion.usage.completion_tokens == 13
    assert completion.body["usage"] == completion.usage.to_openai()


@pytest.mark.parametrize("model", SHAPES)
async def test_complete__same_request__same_answer(sandbox: Adapter, model: str) -> None:
    first = await sandbox.complete(chat(), api_key="", model=model)
    second = await sandbox.complete(chat(), api_key="", model=model)

    assert first.body["choices"] == second.body["choices"] and first.usage == second.usage


@pytest.mark.parametrize("model", SHAPES)
async def test_stream__several_chunks_joining_to_the_complete_answer(sandbox: Adapter, model: str) -> None:
    completion = await sandbox.complete(chat(), api_key="", model=model)

    chunks = [c async for c in sandbox.stream(chat(), api_key="", model=model)]

    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) >= 5
    assert text_of(chunks) == completion.body["choices"][0]["message"]["content"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert finish_reasons(chunks) == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == completion.body["usage"]


@pytest.mark.parametrize("model", SHAPES)
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_max_tokens__respected_with_finish_length(
    sandbox: Adapter, model: str, streaming: bool
) -> None:
    request = chat(max_tokens=3)
    if streaming:
        chunks = [c async for c in sandbox.stream(request, api_key="", model=model)]
        text, reasons, usage = text_of(chunks), finish_reasons(chunks), chunks[-1]["usage"]
    else:
        body = (await sandbox.complete(request, api_key="", model=model)).body
        text, reasons, usage = (
            body["choices"][0]["message"]["content"],
            [body["choices"][0]["finish_reason"]],
            body["usage"],
        )

    assert text == "Sandbox repl"
    assert reasons == ["length"] and usage["completion_tokens"] == 3


@pytest.mark.parametrize("model", SHAPES)
async def test_stop__cuts_the_answer(sandbox: Adapter, model: str) -> None:
    completion = await sandbox.complete(chat(stop="how"), api_key="", model=model)

    assert completion.body["choices"][0]["message"]["content"] == "Sandbox reply to: Hello there, "
    assert completion.body["choices"][0]["finish_reason"] == "stop"


async def test_long_message__summary_is_shortened(sandbox: Adapter) -> None:
    request = chat({"role": "user", "content": "word " * 100})

    content = (await sandbox.complete(request, api_key="", model="sandbox")).body["choices"][0]["message"][
        "content"
    ]

    assert content.endswith("...") and len(content) < 120


async def test_system_and_history__count_as_prompt_but_reply_uses_the_last_user_message(
    sandbox: Adapter,
) -> None:
    request = chat(
        {"role": "system", "content": "s" * 40},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "second"},
    )

    completion = await sandbox.complete(request, api_key="", model="claude-x")

    assert completion.body["choices"][0]["message"]["content"] == "Sandbox reply to: second"
    assert completion.usage.prompt_tokens == (40 + 5 + 6 + 6 + 3) // 4


async def test_n__openai_shape_answers_each_choice_and_bills_them(sandbox: Adapter) -> None:
    single = await sandbox.complete(chat(), api_key="", model="sandbox")
    double = await sandbox.complete(chat(n=2), api_key="", model="sandbox")

    assert [c["index"] for c in double.body["choices"]] == [0, 1]
    assert double.usage.completion_tokens == 2 * single.usage.completion_tokens


@pytest.mark.parametrize(
    ("model", "error_class"),
    [
        ("sandbox-error-401", UpstreamAuthError),
        ("claude-error-429", UpstreamRateLimited),
        ("gemini-error-503", UpstreamUnavailable),
        ("sandbox-error-400", UpstreamBadRequest),
    ],
)
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_error_model__fails_like_that_status(
    sandbox: Adapter, model: str, error_class: type, streaming: bool
) -> None:
    with pytest.raises(error_class) as caught:
        if streaming:
            [c async for c in sandbox.stream(chat(), api_key="", model=model)]
        else:
            await sandbox.complete(chat(), api_key="", model=model)

    assert caught.value.provider == "sandbox"


async def test_empty_messages__bad_request(sandbox: Adapter) -> None:
    with pytest.raises(UpstreamBadRequest):
        await sandbox.complete({"messages": []}, api_key="", model="sandbox")


async def test_check_key__accepts_anything(sandbox: Adapter) -> None:
    assert await sandbox.check_key("anything") is None
