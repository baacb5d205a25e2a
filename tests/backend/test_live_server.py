"""The relay under uvicorn on a loopback port, driven by the official `openai` SDK."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from eth_account import Account
from quotra.app import create_app
from relay_helpers import SANDBOX_KEY, FakeUpstream, listing_body, sign


@contextmanager
def serve(make_settings: Any, adapter_factory: Any = None) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_app(make_settings(public_url=url), adapter_factory=adapter_factory)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def sandbox_listing(url: str, **body: Any) -> dict[str, Any]:
    account = Account.create()
    with httpx.Client(base_url=url) as client:
        message = client.post("/v1/auth/nonce", json={"address": account.address}).json()["message"]
        token = client.post("/v1/auth/verify", json={"message": message, "signature": sign(account, message)})
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        reply = client.post("/v1/listings", json=listing_body(**body), headers=headers)
        assert reply.status_code == 201, reply.text
        return reply.json()


@pytest.fixture
def live_url(make_settings: Any) -> Iterator[str]:
    with serve(make_settings) as url:  # the real sandbox adapter from quotra.upstream
        yield url


async def test_openai_sdk_non_streaming(live_url: str) -> None:
    listing = sandbox_listing(live_url, models=["sandbox-gpt"], max_output_tokens=64)
    client = openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key=SANDBOX_KEY, max_retries=0)
    completion = await client.chat.completions.create(
        model="sandbox-gpt", messages=[{"role": "user", "content": "Say hello to the SDK"}]
    )
    assert completion.object == "chat.completion"
    assert "Say hello to the SDK" in (completion.choices[0].message.content or "")
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    raw = await client.chat.completions.with_raw_response.create(
        model=f"listing/{listing['id']}", messages=[{"role": "user", "content": "again"}]
    )
    assert raw.headers["x-quotra-listing"] == listing["id"]
    models = await client.models.list()
    assert [m.id for m in models.data] == ["sandbox-gpt"]
    await client.close()


async def test_openai_sdk_streaming_with_usage(live_url: str) -> None:
    sandbox_listing(live_url, models=["sandbox-gpt"])
    client = openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key=SANDBOX_KEY, max_retries=0)
    stream = await client.chat.completions.create(
        model="sandbox-gpt",
        messages=[{"role": "user", "content": "Stream me some words please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "Stream me some words please" in "".join(pieces)
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    await client.close()


async def test_openai_sdk_sees_openai_errors(live_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key=SANDBOX_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="m", messages=[])
    bad_key = openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key="sk-unknown", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad_key.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    listing = sandbox_listing(live_url, models=["sandbox-error-503"])
    with pytest.raises(openai.InternalServerError) as upstream:
        await client.chat.completions.create(
            model=f"listing/{listing['id']}", messages=[{"role": "user", "content": "x"}]
        )
    assert upstream.value.status_code == 502
    for c in (client, bad_key):
        await c.close()


async def test_client_disconnect_mid_stream_cancels_the_upstream(make_settings: Any) -> None:
    upstream = FakeUpstream(chunks=200, chunk_delay=0.05)
    with serve(make_settings, adapter_factory=upstream.factory) as url:
        listing = sandbox_listing(url)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            body = {
                "model": f"listing/{listing['id']}",
                "messages": [{"role": "user", "content": "go"}],
                "stream": True,
            }
            async with client.stream(
                "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {SANDBOX_KEY}"}
            ) as reply:
                assert reply.status_code == 200
                lines = reply.aiter_lines()
                assert (await anext(lines)).startswith("data: ")
            # leaving the block closes the connection after one chunk
        deadline = time.monotonic() + 5
        while upstream.stream_closed == 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - another thread
            await asyncio.sleep(0.05)
        assert upstream.stream_cancelled == 1 and upstream.stream_closed == 1
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(base_url=url) as client:
            metrics = (await client.get("/metrics")).text
        assert f'quotra_listing_calls_total{{listing="{listing["id"]}",outcome="cancelled"}} 1.0' in metrics
