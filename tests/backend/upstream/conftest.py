"""Upstream adapter tests: the fake upstreams (one set per session, real HTTP) and a harness per
upstream kind, so behaviour every provider shares is tested once for all of them."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

# tests/backend is on sys.path once its conftest.py is loaded; this also covers `--confcutdir` runs.
_BACKEND_TESTS = str(Path(__file__).resolve().parents[1])
if _BACKEND_TESTS not in sys.path:
    sys.path.insert(0, _BACKEND_TESTS)

from fakes import FakeUpstreams, start_fake_upstreams  # noqa: E402
from upstream_helpers import KINDS, Harness, upstream_session  # noqa: E402


@pytest.fixture(scope="session")
def fake_upstreams() -> Iterator[FakeUpstreams]:
    with start_fake_upstreams() as fakes:
        yield fakes


@pytest.fixture(autouse=True)
def _fresh_recorder(fake_upstreams: FakeUpstreams) -> Iterator[None]:
    fake_upstreams.recorder.clear()
    yield


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with upstream_session() as upstreams:
        yield upstreams


@pytest.fixture(params=KINDS)
def harness(
    request: pytest.FixtureRequest, fake_upstreams: FakeUpstreams, session: aiohttp.ClientSession
) -> Harness:
    return Harness(request.param, fake_upstreams, session)
