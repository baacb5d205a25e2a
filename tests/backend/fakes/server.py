"""Start the fake OpenAI, Anthropic and Gemini upstreams on free 127.0.0.1 ports."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from quotra_dev.localmodel import run_in_thread

from . import anthropic_app, gemini_app, openai_app
from .recorder import Recorder
from .scenarios import FAKE_API_KEY


@dataclass(frozen=True)
class FakeUpstreams:
    openai: str  # base URLs, e.g. http://127.0.0.1:41234 (no /v1)
    anthropic: str
    gemini: str
    api_key: str  # the only key the fakes accept
    recorder: Recorder

    @property
    def base_urls(self) -> dict[str, str]:
        """Base URL per upstream kind, as `get_adapter(kind, base_url=...)` takes it."""
        return {
            "openai": self.openai,
            "openai-compatible": self.openai + "/v1",
            "anthropic": self.anthropic,
            "gemini": self.gemini,
        }


@contextlib.contextmanager
def start_fake_upstreams(api_key: str = FAKE_API_KEY) -> Iterator[FakeUpstreams]:
    """Run the three fakes (uvicorn, one background thread) until the block exits.

    Usable from pytest fixtures of any scope and from plain scripts; the servers have their own
    event loop, so they outlive the per-test loops of pytest-asyncio.
    """
    recorder = Recorder()
    apps = (
        openai_app.create_app(recorder, api_key),
        anthropic_app.create_app(recorder, api_key),
        gemini_app.create_app(recorder, api_key),
    )
    with run_in_thread(*apps) as (openai, anthropic, gemini):
        yield FakeUpstreams(openai, anthropic, gemini, api_key, recorder)
