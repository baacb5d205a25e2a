"""The local model server speaks OpenAI's wire format well enough for the official SDK."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import openai
import pytest
from quotra_dev.localmodel import create_app, run_in_thread

KEY = "sk-local-test-key-0123456789"
# One TLS context for every SDK client: building one per client costs ~60 ms.
TLS = ssl.create_default_context()


@pytest.fixture(scope="module")
def local_url() -> Iterator[str]:
    with run_in_thread(create_app(api_key=KEY, models=["quotra-local-1", "tiny"])) as [url]:
        yield url


def sdk(url: str, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=url + "/v1",
        api_key=key,
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(verify=TLS),
    )


async def test_sdk__chat_completion(local_url: str) -> None:
    async with sdk(local_url) as client:
        answer = await client.chat.completions.create(
            model="quotra-local-1", messages=[{"role": "user", "content": "ping"}], max_tokens=50
        )

    assert answer.choices[0].message.content == "Sandbox reply to: ping"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.total_tokens == 1 + 6


async def test_sdk__stream_with_usage(local_url: str) -> None:
    async with sdk(local_url) as client:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "ping pong"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Sandbox reply to: ping pong"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])


async def test_sdk__stream_without_include_usage__no_usage_chunk(local_url: str) -> None:
    async with sdk(local_url) as client:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], stream=True
        )
        chunks = [chunk async for chunk in stream]

    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_sdk__models(local_url: str) -> None:
    async with sdk(local_url) as client:
        models = [m.id async for m in client.models.list()]

    assert models == ["quotra-local-1", "tiny"]


async def test_sdk__wrong_key__authentication_error_with_masked_key(local_url: str) -> None:
    wrong = "sk-wrong-0123456789abcdef"
    async with sdk(local_url, key=wrong) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.models.list()

    assert caught.value.code == "invalid_api_key"
    assert "Incorrect API key provided" in str(caught.value) and wrong not in str(caught.value)


async def test_sdk__unknown_model__not_found(local_url: str) -> None:
    async with sdk(local_url) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])


async def test_sdk__no_messages__bad_request(local_url: str) -> None:
    async with sdk(local_url) as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="tiny", messages=[])
