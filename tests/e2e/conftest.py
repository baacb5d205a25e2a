"""End to end on the Base Sepolia twin: a real anvil (MockUSDC at the real USDC address), the
escrow deployed from its compiled artifact, and the relay served by uvicorn on a loopback port.

The relay's and the settlement worker's database is SQLite, and also PostgreSQL when
QUOTRA_TEST_POSTGRES_URL is set (tools/with-postgres.sh): tests taking `start_relay` or `kit` run
once per backend."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

BACKEND_TESTS = Path(__file__).resolve().parents[1] / "backend"
for extra in (BACKEND_TESTS, BACKEND_TESTS / "payments"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from e2e_helpers import Kit, OnChain, Served, deploy_escrow, relay_settings, serve_app  # noqa: E402
from quotra.calls.outbox import Outbox  # noqa: E402
from quotra.calls.store import CallStore  # noqa: E402
from quotra.chain.client import EscrowClient  # noqa: E402
from quotra.chain.relayer import DirectRelayer  # noqa: E402
from quotra.store.db import create_engine, upgrade  # noqa: E402
from quotra.store.repositories import Store  # noqa: E402
from quotra.store.transactions import Transactions  # noqa: E402
from quotra_dev import twin  # noqa: E402
from relay_helpers import create_pg_database  # noqa: E402

PG_URL = os.environ.get("QUOTRA_TEST_POSTGRES_URL")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database_url" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", ["sqlite", "postgresql"] if PG_URL else ["sqlite"])


@pytest.fixture
async def database_url(backend_name: str, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database of the test's backend, kept for the whole test."""
    if backend_name == "postgresql":
        assert PG_URL is not None
        url, drop = await create_pg_database(PG_URL)
        try:
            yield url
        finally:
            await drop()
    else:
        yield f"sqlite+aiosqlite:///{tmp_path / 'quotra.db'}"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("QUOTRA_") and key != "QUOTRA_TEST_POSTGRES_URL":
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def onchain() -> Iterator[OnChain]:
    with twin.start() as chain_:
        onchain = deploy_escrow(chain_)
        chain_.mint_usdc(onchain.operator.address, 1_000 * 10**6)  # it pays for the front-runs it reconciles
        yield onchain


@pytest.fixture
def start_relay(onchain: OnChain, tmp_path: Path, database_url: str) -> Callable[..., Any]:
    """`with start_relay(**settings) as served:` a relay on the twin; the database is kept per test,
    so a second relay started in the same test continues where the first stopped."""

    @contextmanager
    def start(adapter_factory: Any = None, **overrides: Any) -> Iterator[Served]:
        from quotra.app import create_app

        def build(url: str) -> Any:
            settings = relay_settings(onchain, tmp_path, database_url, url, **overrides)
            return create_app(settings, adapter_factory=adapter_factory)

        with serve_app(build) as served:
            yield served

    start.database_url = database_url  # type: ignore[attr-defined]
    return start


@pytest.fixture
async def kit(onchain: OnChain, database_url: str) -> AsyncIterator[Kit]:
    engine = create_engine(database_url)
    await upgrade(engine)
    store = Store(engine)
    client = EscrowClient.connect(
        onchain.twin.rpc_url, escrow=onchain.escrow.address, usdc=onchain.usdc.address, chain_id=84532
    )
    relayer = DirectRelayer(client.w3, onchain.operator, chain_id=84532)
    transactions = Transactions(engine)
    try:
        yield Kit(
            onchain, store, CallStore(engine, transactions), Outbox(engine, transactions), client, relayer
        )
    finally:
        await transactions.close()
        await engine.dispose()
