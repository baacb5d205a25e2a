"""Helpers for the upstream adapter tests (fixtures live in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
from fakes import FakeUpstreams, scenarios
from quotra.netguard import NetGuard
from quotra.upstream import Adapter, Completion, UpstreamError, create_session, get_adapter

KINDS = ("openai", "openai-compatible", "anthropic", "gemini")
USER = "Hello there, how are you today?"
LOOPBACK_ALLOWED = NetGuard(allow_private=True)


def upstream_session(*, timeout: float = 5.0, guard: NetGuard = LOOPBACK_ALLOWED) -> aiohttp.ClientSession:
    """The relay's upstream session (`create_session`); by default it may reach the fakes on
    loopback."""
    return create_session(timeout=timeout, guard=guard)


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An OpenAI chat request; one user message saying USER unless messages are given."""
    return {
        "model": "client-side-name",
        "messages": list(messages) or [{"role": "user", "content": USER}],
        **extra,
    }


@dataclass
class Harness:
    """One upstream kind pointed at its fake."""

    kind: str
    fakes: FakeUpstreams
    session: aiohttp.ClientSession

    @property
    def provider(self) -> str:
        """The fake that serves this kind (openai-compatible is the fake OpenAI)."""
        return "openai" if self.kind.startswith("openai") else self.kind

    @property
    def key(self) -> str:
        return self.fakes.api_key

    def adapter(
        self, *, session: aiohttp.ClientSession | None = None, base_url: str | None = None
    ) -> Adapter:
        url = base_url or self.fakes.base_urls[self.kind]
        return get_adapter(self.kind, session=session or self.session, base_url=url)

    def expected_text(self, user: str = USER) -> str:
        if self.provider == "openai":  # localmodel's sandbox reply
            return "Sandbox reply to: " + user
        return "Echo: " + user

    async def complete(
        self, request: dict[str, Any] | None = None, *, model: str = scenarios.MODEL, key: str | None = None
    ) -> Completion:
        return await self.adapter().complete(request or chat(), api_key=key or self.key, model=model)

    async def collect(
        self, request: dict[str, Any] | None = None, *, model: str = scenarios.MODEL, key: str | None = None
    ) -> list[dict[str, Any]]:
        stream = self.adapter().stream(request or chat(), api_key=key or self.key, model=model)
        return [chunk async for chunk in stream]


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def finish_reasons(chunks: list[dict[str, Any]]) -> list[str]:
    return [
        c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
    ]


def assert_key_hidden(error: UpstreamError, key: str) -> None:
    """The key is in no message, repr or attribute, and no chained exception carries it."""
    assert key not in str(error)
    assert key not in repr(error)
    assert all(key not in repr(value) for value in vars(error).values())
    assert error.__cause__ is None
    assert error.__context__ is None or key not in repr(error.__context__)
