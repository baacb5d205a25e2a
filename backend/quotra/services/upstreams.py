"""One adapter per (kind, base URL), created once and shared, all on the app's upstream session."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp

from quotra.upstream.base import Adapter

AdapterFactory = Callable[..., Adapter]


class AdapterRegistry:
    def __init__(self, session: aiohttp.ClientSession, *, factory: AdapterFactory | None = None) -> None:
        if factory is None:
            from quotra.upstream import get_adapter

            factory = get_adapter
        self._factory = factory
        self._session = session
        self._adapters: dict[tuple[str, str | None], Adapter] = {}

    def get(self, kind: str, base_url: str | None = None) -> Adapter:
        key = (kind, base_url)
        adapter = self._adapters.get(key)
        if adapter is None:
            kwargs: dict[str, Any] = {"session": self._session}
            if base_url is not None:
                kwargs["base_url"] = base_url
            adapter = self._adapters[key] = self._factory(kind, **kwargs)
        return adapter
