"""A route whose dependency is out of reach answers 503 with Retry-After, not 500: the errors are
the real ones, raised by web3, aiohttp and httpx against a port nothing listens on."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import httpx
import pytest
from fastapi import FastAPI
from quotra.app import OUTAGE_RETRY_AFTER, install_error_handlers
from quotra.chain.relayer import RelayerError
from web3 import AsyncHTTPProvider, AsyncWeb3


def _closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def _web3_read(url: str) -> Any:
    w3 = AsyncWeb3(AsyncHTTPProvider(url, request_kwargs={"timeout": 2}))
    return await w3.eth.block_number


async def _aiohttp_get(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status


async def _httpx_post(url: str) -> Any:
    async with httpx.AsyncClient() as client:
        return (await client.post(url, json={})).status_code


async def _relayer(url: str) -> Any:
    try:
        await _httpx_post(url)
    except httpx.HTTPError as exc:
        raise RelayerError(f"relayer unreachable: {exc}") from exc


async def _bug(url: str) -> Any:
    raise ValueError("a bug, not an outage")


def _app(work: Callable[[str], Awaitable[Any]], url: str) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/route")
    async def route() -> Any:
        return await work(url)

    return app


@pytest.mark.parametrize("work", [_web3_read, _aiohttp_get, _httpx_post, _relayer])
async def test_an_unreachable_dependency_is_a_503_with_retry_after(work: Any) -> None:
    app = _app(work, _closed_port())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        response = await client.get("/route")
    assert response.status_code == 503
    assert response.headers["retry-after"] == str(OUTAGE_RETRY_AFTER)
    assert response.json()["error"]["code"] == "dependency_unavailable"


async def test_a_bug_is_still_a_500_without_its_traceback() -> None:
    app = _app(_bug, _closed_port())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        response = await client.get("/route")
    assert response.status_code == 500
    assert "a bug" not in response.text and "Traceback" not in response.text
