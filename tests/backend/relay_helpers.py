"""Test support: a controllable fake upstream adapter and small helpers (no network)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
from eth_account import Account
from eth_account.messages import encode_defunct
from quotra.upstream.base import Completion, UpstreamAuthError, UpstreamError, Usage

MASTER_KEY = "9f" * 8 + "31" * 8 + "a7" * 8 + "c2" * 8
SANDBOX_KEY = "sk-quotra-sandbox-test"


@dataclass
class FakeUpstream:
    """Shared by every FakeAdapter of one app: scripted failures, delays, what was seen."""

    failures: list[UpstreamError] = field(default_factory=list)
    delay: float = 0.0
    chunk_delay: float = 0.0
    chunks: int = 3
    calls: list[dict[str, Any]] = field(default_factory=list)
    keys_seen: list[str] = field(default_factory=list)
    refused_keys: set[str] = field(default_factory=lambda: {"sk-bad"})
    stream_closed: int = 0
    stream_cancelled: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    def factory(self, kind: str, *, session: aiohttp.ClientSession, base_url: str | None = None):
        return FakeAdapter(self, kind, base_url)


class FakeAdapter:
    def __init__(self, upstream: FakeUpstream, kind: str, base_url: str | None) -> None:
        self.up = upstream
        self.kind = kind
        self.base_url = base_url

    def _record(self, request: dict[str, Any], api_key: str, model: str) -> None:
        self.up.calls.append({"request": request, "model": model, "kind": self.kind})
        self.up.keys_seen.append(api_key)
        if self.up.failures:
            raise self.up.failures.pop(0)

    @staticmethod
    def _usage(request: dict[str, Any]) -> Usage:
        chars = sum(
            len(m.get("content") or "") for m in request["messages"] if isinstance(m.get("content"), str)
        )
        out = min(8, request.get("max_tokens") or request.get("max_completion_tokens") or 8)
        return Usage(max(1, chars // 4), out)

    async def complete(self, request: dict[str, Any], *, api_key: str, model: str) -> Completion:
        self.up.in_flight += 1
        self.up.max_in_flight = max(self.up.max_in_flight, self.up.in_flight)
        try:
            if self.up.delay:
                await asyncio.sleep(self.up.delay)
            self._record(request, api_key, model)
            usage = self._usage(request)
            body = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"echo from {model}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage.to_openai(),
            }
            return Completion(body, usage)
        finally:
            self.up.in_flight -= 1

    async def stream(
        self, request: dict[str, Any], *, api_key: str, model: str
    ) -> AsyncIterator[dict[str, Any]]:
        self._record(request, api_key, model)
        usage = self._usage(request)
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        try:
            for index in range(self.up.chunks):
                if self.up.chunk_delay:
                    await asyncio.sleep(self.up.chunk_delay)
                delta = (
                    {"role": "assistant", "content": f"part{index} "}
                    if index == 0
                    else {"content": f"part{index} "}
                )
                yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield {**base, "choices": [], "usage": usage.to_openai()}
        except asyncio.CancelledError:
            self.up.stream_cancelled += 1
            raise
        finally:
            self.up.stream_closed += 1

    async def check_key(self, api_key: str) -> None:
        self.up.keys_seen.append(api_key)
        if api_key in self.up.refused_keys:
            raise UpstreamAuthError("Incorrect API key provided", provider=self.kind)


def sign(account: Any, text: str) -> str:
    return "0x" + Account.sign_message(encode_defunct(text=text), account.key).signature.hex().removeprefix(
        "0x"
    )


async def sign_in(client: httpx.AsyncClient, account: Any) -> str:
    nonce = await client.post("/v1/auth/nonce", json={"address": account.address})
    assert nonce.status_code == 201, nonce.text
    message = nonce.json()["message"]
    reply = await client.post(
        "/v1/auth/verify", json={"message": message, "signature": sign(account, message)}
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["access_token"]


def listing_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "sandbox", "models": ["sandbox-model"], "price_per_call": "0.001"}
    body.update(overrides)
    return body


def chat_body(model: str = "sandbox-model", content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def create_pg_database(server_url: str) -> tuple[str, Callable[[], Any]]:
    """A fresh database on the PostgreSQL server at `server_url`: its URL, and a coroutine
    function that drops it."""
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"quotra_test_{uuid.uuid4().hex[:12]}"
    dsn_kwargs: dict[str, Any] = {"user": url.username, "database": url.database or "postgres"}
    if url.password:
        dsn_kwargs["password"] = url.password
    host = url.query.get("host") or url.host
    dsn_kwargs["host"] = host
    if url.port:
        dsn_kwargs["port"] = url.port
    admin = await asyncpg.connect(**dsn_kwargs)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()

    async def drop() -> None:
        admin = await asyncpg.connect(**dsn_kwargs)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    return url.set(database=name).render_as_string(hide_password=False), drop
