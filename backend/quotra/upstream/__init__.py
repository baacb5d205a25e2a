"""Upstream adapters: one per provider kind, all speaking OpenAI chat-completions to the relay.

`get_adapter(kind, client=...)` returns an `Adapter` (see `base`); adapters are cheap to build
and hold no per-request state, so one per listing (or per call) is fine.
"""

from __future__ import annotations

import httpx

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
    "get_adapter",
]

UPSTREAM_KINDS = ("openai", "anthropic", "gemini", "openai-compatible", "sandbox")


def get_adapter(
    kind: str, *, client: httpx.AsyncClient, base_url: str | None = None, timeout: float = 60.0
) -> Adapter:
    """The adapter for an upstream `kind`, sending through the shared `client`.

    `base_url` overrides the provider's default; `openai-compatible` requires one. `timeout` (in
    seconds) bounds connecting and each read, so a stream may run longer as long as it flows.
    The sandbox ignores all three: it never touches the network.
    """
    if kind == "openai":
        return OpenAIAdapter(client=client, base_url=base_url, timeout=timeout)
    if kind == "openai-compatible":
        if not base_url:
            raise ValueError("an openai-compatible upstream needs a base_url")
        return OpenAIAdapter(client=client, base_url=base_url, timeout=timeout, kind=kind)
    if kind == "anthropic":
        return AnthropicAdapter(client=client, base_url=base_url, timeout=timeout)
    if kind == "gemini":
        return GeminiAdapter(client=client, base_url=base_url, timeout=timeout)
    if kind == "sandbox":
        return SandboxAdapter()
    raise ValueError(f"unknown upstream kind {kind!r}; expected one of {', '.join(UPSTREAM_KINDS)}")
