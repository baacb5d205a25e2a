"""The payment tests' relay: the app in process with a fake chain (`prepaid_helpers`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prepaid_helpers import PrepaidRelay, prepaid_relay_factory


@pytest.fixture
def start(make_settings: Callable[..., Any]) -> Callable[..., Any]:
    """Starts a relay with settings overridden (`async with start(**overrides) as relay`)."""
    return prepaid_relay_factory(make_settings)


@pytest.fixture
async def relay(start: Callable[..., Any]) -> AsyncIterator[PrepaidRelay]:
    async with start() as running:
        yield running
