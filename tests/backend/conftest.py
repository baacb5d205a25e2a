"""Backend fixtures: apps on a temporary database (SQLite, and PostgreSQL when
QUOTRA_TEST_POSTGRES_URL is set by tools/with-postgres.sh), signed-in wallets, fake upstreams."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from eth_account import Account
from fastapi import FastAPI
from quotra.app import create_app
from quotra.config import Settings
from relay_helpers import MASTER_KEY, SANDBOX_KEY, FakeUpstream, create_pg_database, sign_in

PG_URL = os.environ.get("QUOTRA_TEST_POSTGRES_URL")
_pg_counts = {"postgresql": 0, "sqlite": 0}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Store tests take `db_url`: SQLite always, PostgreSQL whenever a server is provided.
    if "backend_name" in metafunc.fixturenames:
        backends = ["sqlite", "postgresql"] if PG_URL else ["sqlite"]
        metafunc.parametrize("backend_name", backends)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not (_pg_counts["sqlite"] or _pg_counts["postgresql"]):
        return
    if PG_URL:
        line = (
            f"PostgreSQL: {_pg_counts['postgresql']} store tests ran against PostgreSQL "
            f"(and {_pg_counts['sqlite']} on SQLite)"
        )
    else:
        line = (
            f"PostgreSQL: not available, {_pg_counts['sqlite']} store tests ran on SQLite only "
            "(run through tools/with-postgres.sh to include PostgreSQL)"
        )
    terminalreporter.write_sep("-", line, yellow=not PG_URL, green=bool(PG_URL))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("QUOTRA_") and key != "QUOTRA_TEST_POSTGRES_URL":
            monkeypatch.delenv(key)


@pytest.fixture
async def db_url(backend_name: str, tmp_path: Any) -> AsyncIterator[str]:
    """A fresh, empty database: parametrized over SQLite and (when available) PostgreSQL."""
    _pg_counts[backend_name] += 1
    if backend_name == "postgresql":
        url, drop = await create_pg_database(PG_URL)
        try:
            yield url
        finally:
            await drop()
    else:
        yield f"sqlite+aiosqlite:///{tmp_path / 'quotra.db'}"


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'quotra.db'}"


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def make_settings(tmp_path: Any, sqlite_url: str) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "env": "test",
            "data_dir": tmp_path / "data",
            "database_url": sqlite_url,
            "master_key": MASTER_KEY,
            "public_url": "http://testserver",
            "sandbox_api_keys": [SANDBOX_KEY],
            "log_json": False,
            "listing_cache_ttl_seconds": 0.0,
            # Tests sign many wallets in from one client address (test_rate_limits sets its own).
            "signin_rate_per_minute": 10_000,
            "signin_rate_per_minute_ip": 10_000,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return build


@dataclass
class Relay:
    app: FastAPI
    client: httpx.AsyncClient
    upstream: FakeUpstream

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    async def provider(self, account: Any | None = None) -> tuple[Any, dict[str, str]]:
        account = account or Account.create()
        token = await sign_in(self.client, account)
        return account, {"Authorization": f"Bearer {token}"}

    async def listing(self, headers: dict[str, str], **body: Any) -> dict[str, Any]:
        from relay_helpers import listing_body

        reply = await self.client.post("/v1/listings", json=listing_body(**body), headers=headers)
        assert reply.status_code == 201, reply.text
        return reply.json()


@pytest.fixture
def start_relay(make_settings: Callable[..., Settings], upstream: FakeUpstream) -> Callable[..., Any]:
    @asynccontextmanager
    async def start(
        client_ip: str = "203.0.113.7", erc1271: Any = None, **overrides: Any
    ) -> AsyncIterator[Relay]:
        app = create_app(make_settings(**overrides), adapter_factory=upstream.factory, erc1271=erc1271)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=(client_ip, 40000))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://testserver", timeout=30
            ) as client:
                yield Relay(app, client, upstream)

    return start


@pytest.fixture
async def relay(start_relay: Callable[..., Any]) -> AsyncIterator[Relay]:
    async with start_relay() as running:
        yield running
