"""pytest fixtures for the fakes; import them into a conftest.py:

from fakes.fixtures import fake_upstreams  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .server import FakeUpstreams, start_fake_upstreams


@pytest.fixture(scope="session")
def fake_upstreams() -> Iterator[FakeUpstreams]:
    with start_fake_upstreams() as fakes:
        yield fakes
