"""Fake OpenAI, Anthropic and Gemini upstreams that speak each provider's real wire format over
real HTTP, for tests and demos.

`tests/backend` is on `sys.path` under pytest (its conftest.py sits there), so import this as
`fakes`; the name `tests` itself is shadowed by a stray `tests` package in site-packages.

    from fakes import start_fake_upstreams
    with start_fake_upstreams() as fakes:
        fakes.base_urls["anthropic"], fakes.api_key, fakes.recorder

From a shell: `python tests/backend/fakes` prints the URLs and serves until Ctrl-C. What each
fake does is picked by the model name (see `scenarios`).
"""

from . import scenarios
from .recorder import RecordedRequest, Recorder, StreamClose
from .scenarios import FAKE_API_KEY
from .server import FakeUpstreams, start_fake_upstreams

__all__ = [
    "FAKE_API_KEY",
    "FakeUpstreams",
    "RecordedRequest",
    "Recorder",
    "StreamClose",
    "scenarios",
    "start_fake_upstreams",
]
