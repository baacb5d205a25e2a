"""OpenAI / OpenAI-compatible specifics: what is sent, SSE quirks, servers that report less."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer
from fakes import FakeUpstreams, scenarios
from quotra.upstream import UpstreamRateLimited, UpstreamUnavailable, get_adapter
from quotra.upstream._http import json_dumps
from quotra.upstream.openai import OpenAIAdapter
from upstream_helpers import chat, text_of


@pytest.fixture
def openai(fake_upstreams: FakeUpstreams, session: aiohttp.ClientSession) -> OpenAIAdapter:
    adapter = get_adapter("openai", session=session, base_url=fake_upstreams.openai)
    assert isinstance(adapter, OpenAIAdapter)
    return adapter


async def test_complete__request_passes_through_with_the_listing_model(
    openai: OpenAIAdapter, fake_upstreams: FakeUpstreams
) -> None:
    request = chat(
        temperature=0.2, top_p=0.9, n=2, seed=7, stream=True, stream_options={"include_usage": True}
    )

    completion = await openai.complete(request, api_key=fake_upstreams.api_key, model=scenarios.MODEL)

    seen = fake_upstreams.recorder.last_request("openai")
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {fake_upstreams.api_key}"
    expected = {k: v for k, v in request.items() if k != "stream_options"} | {
        "model": scenarios.MODEL,
        "stream": False,
    }
    assert seen.body == expected
    assert [c["index"] for c in completion.body["choices"]] == [0, 1]


async def test_stream__asks_for_usage_and_keeps_other_stream_options(
    openai: OpenAIAdapter, fake_upstreams: FakeUpstreams
) -> None:
    request = chat(stream_options={"include_obfuscation": False})

    chunks = [c async for c in openai.stream(request, api_key=fake_upstreams.api_key, model=scenarios.MODEL)]

    body = fake_upstreams.recorder.last_request("openai").body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


async def test_stream__comments_crlf_and_split_data_lines__parsed(
    openai: OpenAIAdapter, fake_upstreams: FakeUpstreams
) -> None:
    chunks = [
        c async for c in openai.stream(chat(), api_key=fake_upstreams.api_key, model=scenarios.SSE_QUIRKS)
    ]

    assert text_of(chunks) == "Sandbox reply to: Hello there, how are you today?"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_openai_compatible__base_url_with_v1__posts_to_v1_chat_completions(
    fake_upstreams: FakeUpstreams, session: aiohttp.ClientSession
) -> None:
    adapter = get_adapter("openai-compatible", session=session, base_url=fake_upstreams.openai + "/v1/")

    await adapter.complete(chat(), api_key=fake_upstreams.api_key, model=scenarios.MODEL)

    assert fake_upstreams.recorder.last_request("openai").path == "/v1/chat/completions"


# --------------------------------------------------------------------------------------------
# Servers that report less than OpenAI (scripted: a one-handler server on loopback)
# --------------------------------------------------------------------------------------------

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Scripted = Callable[[Handler], Awaitable[OpenAIAdapter]]


@pytest.fixture
async def scripted(session: aiohttp.ClientSession) -> AsyncIterator[Scripted]:
    """`await scripted(handler)`: an openai-compatible adapter whose server answers with `handler`."""
    servers: list[RawTestServer] = []

    async def start(handler: Handler) -> OpenAIAdapter:
        server = RawTestServer(handler)
        await server.start_server()
        servers.append(server)
        return OpenAIAdapter(session=session, base_url=str(server.make_url("/v1")), kind="openai-compatible")

    yield start
    for server in servers:
        await server.close()


def answer(
    status: int = 200, *, json: Any = None, body: bytes = b"", headers: dict[str, str] | None = None
) -> Handler:
    """A handler that always sends this answer (`json` encoded, or `body` as it is)."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        content = json_dumps(json) if json is not None else body
        return web.Response(status=status, body=content, headers=headers)

    return handler


def sse_body(*payloads: Any, done: bool = True) -> bytes:
    frames = b"".join(b"data: " + json_dumps(p) + b"\n\n" for p in payloads)
    return frames + (b"data: [DONE]\n\n" if done else b"")


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {"content": content} if content is not None else {}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [choice],
        **extra,
    }


async def test_complete__server_reports_no_usage__usage_is_estimated(scripted: Scripted) -> None:
    reply = {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "a" * 40}}],
    }
    adapter = await scripted(answer(json=reply))

    completion = await adapter.complete(chat({"role": "user", "content": "b" * 80}), api_key="", model="m")

    assert completion.usage.prompt_tokens == 20 and completion.usage.completion_tokens == 10
    assert completion.body["usage"] == completion.usage.to_openai()


async def test_request__empty_api_key__no_authorization_header(scripted: Scripted) -> None:
    seen: list[web.BaseRequest] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(request)
        return web.json_response({"object": "list", "data": []})

    await (await scripted(handler)).check_key("")

    assert "authorization" not in seen[0].headers


async def test_stream__server_ignores_include_usage__final_usage_chunk_is_estimated(
    scripted: Scripted,
) -> None:
    body = sse_body(chunk("abcd" * 3), chunk(finish="stop"))
    adapter = await scripted(answer(body=body, headers={"content-type": "text/event-stream"}))

    chunks = [
        c async for c in adapter.stream(chat({"role": "user", "content": "x" * 8}), api_key="k", model="m")
    ]

    assert chunks[-1]["choices"] == [] and chunks[-1]["id"] == "c1"
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


async def test_stream__usage_on_a_content_chunk_and_no_done__usage_moves_to_a_final_chunk(
    scripted: Scripted,
) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    adapter = await scripted(
        answer(body=sse_body(chunk("hi"), chunk(finish="stop", usage=usage), done=False))
    )

    chunks = [c async for c in adapter.stream(chat(), api_key="k", model="m")]

    assert [c.get("usage") for c in chunks[:-1]] == [None, None]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage


async def test_stream__ends_without_done_or_finish__unavailable(scripted: Scripted) -> None:
    adapter = await scripted(answer(body=sse_body(chunk("hi"), done=False)))

    with pytest.raises(UpstreamUnavailable, match=r"\[DONE\]"):
        [c async for c in adapter.stream(chat(), api_key="k", model="m")]


async def test_stream__invalid_json_event__unavailable(scripted: Scripted) -> None:
    adapter = await scripted(answer(body=b"data: {not json\n\n"))

    with pytest.raises(UpstreamUnavailable, match="invalid JSON"):
        [c async for c in adapter.stream(chat(), api_key="k", model="m")]


async def test_stream__megabyte_data_line_cut_inside_a_character__arrives_whole(scripted: Scripted) -> None:
    # aiohttp's own line reader refuses lines over 512 KiB (twice its read buffer).
    text = "é€😀" * 120_000  # 1,080,000 bytes of two-, three- and four-byte characters
    body = sse_body(chunk(text), chunk(finish="stop"))
    cut = body.index("€".encode()) + 1

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body[:cut])
        await asyncio.sleep(0.05)  # the rest comes later, in a chunk of its own
        await response.write(body[cut:])
        return response

    adapter = await scripted(handler)

    chunks = [c async for c in adapter.stream(chat(), api_key="k", model="m")]

    assert text_of(chunks) == text


async def test_complete__html_error_page__message_kept_and_mapped(scripted: Scripted) -> None:
    adapter = await scripted(answer(502, body=b"<html><body>Bad gateway</body></html>"))

    with pytest.raises(UpstreamUnavailable, match="Bad gateway") as caught:
        await adapter.complete(chat(), api_key="k", model="m")

    assert caught.value.status_code == 502


async def test_complete__insufficient_quota__rate_limited_but_not_retryable(scripted: Scripted) -> None:
    error = {
        "error": {
            "message": "You exceeded your current quota",
            "type": "insufficient_quota",
            "code": "insufficient_quota",
        }
    }
    adapter = await scripted(answer(429, json=error, headers={"retry-after-ms": "1500"}))

    with pytest.raises(UpstreamRateLimited) as caught:
        await adapter.complete(chat(), api_key="k", model="m")

    assert caught.value.retryable is False
    assert caught.value.error_type == "insufficient_quota"
    assert caught.value.retry_after == 1.5
