"""Upstream adapters: one per provider kind, all speaking OpenAI chat-completions to the relay.

`get_adapter(kind, session=...)` returns an `Adapter` (see `base`); adapters are cheap to build
and hold no per-request state, so one per listing (or per call) is fine. They all send through
one `aiohttp.ClientSession` from `create_session`.
"""

from __future__ import annotations

import aiohttp

from ._http import create_session
from .anthropic import AnthropicAdapter
from .base import (
    Adapter,
    Completion,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
    Usage,
)
from .gemini import GeminiAdapter
from .openai import OpenAIAdapter
from .sandbox import SandboxAdapter

__all__ = [
    "UPSTREAM_KINDS",
    "Adapter",
    "AnthropicAdapter",
    "Completion",
    "GeminiAdapter",
    "OpenAIAdapter",
    "SandboxAdapter",
    "UpstreamAuthError",
    "UpstreamBadRequest",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamUnavailable",
    "Usage",
    "create_session",
    "get_adapter",
]

UPSTREAM_KINDS = ("openai", "anthropic", "gemini", "openai-compatible", "sandbox")


def get_adapter(kind: str, *, session: aiohttp.ClientSession, base_url: str | None = None) -> Adapter:
    """The adapter for an upstream `kind`, sending through the shared `session`.

    `base_url` overrides the provider's default; `openai-compatible` requires one. The sandbox
    ignores both: it never touches the network.
    """
    if kind == "openai":
        return OpenAIAdapter(session=session, base_url=base_url)
    if kind == "openai-compatible":
        if not base_url:
            raise ValueError("an openai-compatible upstream needs a base_url")
        return OpenAIAdapter(session=session, base_url=base_url, kind=kind)
    if kind == "anthropic":
        return AnthropicAdapter(session=session, base_url=base_url)
    if kind == "gemini":
        return GeminiAdapter(session=session, base_url=base_url)
    if kind == "sandbox":
        return SandboxAdapter()
    raise ValueError(f"unknown upstream kind {kind!r}; expected one of {', '.join(UPSTREAM_KINDS)}")
