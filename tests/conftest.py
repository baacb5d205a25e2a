"""Shared by every test directory: keeps ape's pytest plugin to the contract tests.

`make test` runs one pytest session over tests/contracts, tests/backend and tests/e2e. ape's
plugin (installed with eth-ape, always loaded) would otherwise connect its provider (launch an
anvil) whenever any test is collected and wrap *every* test in a chain snapshot/revert: ~15 ms
per backend test. Here its isolation is applied only to tests under tests/contracts/, and its
provider is connected only when such a test was collected. The network is ape-config.yaml's
default, `ethereum:local:foundry` (override with `--network`).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# Tests that run on ape's provider (the twin tests start their own anvil but live here too).
APE_TESTS_DIR = TESTS_DIR / "contracts"
_APE_STATE = pytest.StashKey[dict[str, bool]]()

# What the Makefile exports, for a bare `.venv/bin/pytest`: ape's data stays in the project and
# ape-foundry finds the npm-pinned anvil.
os.environ.setdefault("APE_DATA_FOLDER", str(REPO_ROOT / ".cache" / "ape"))
if shutil.which("anvil") is None and (REPO_ROOT / "node_modules" / ".bin" / "anvil").exists():
    os.environ["PATH"] = f"{REPO_ROOT / 'node_modules' / '.bin'}{os.pathsep}{os.environ.get('PATH', '')}"


# The invariant state machine drives its own anvil with plain JSON-RPC, not ape.
NON_APE_DIRS = (APE_TESTS_DIR / "invariants",)


def uses_ape(item: pytest.Item) -> bool:
    """Whether `item` is an ape test (runs on ape's provider, with chain isolation)."""
    parents = Path(item.path).parents
    return APE_TESTS_DIR in parents and not any(d in parents for d in NON_APE_DIRS)


@pytest.hookimpl(trylast=True)  # after ape's own pytest_configure registered its runner
def pytest_configure(config: pytest.Config) -> None:
    # ape-vyper's config model triggers this pydantic-settings warning on every run; not ours.
    config.addinivalue_line("filterwarnings", "ignore:Field 'import_remapping' has an incomplete definition")
    runner: Any = config.pluginmanager.get_plugin("ape-test")
    if runner is None:  # ape's plugin disabled (-p no:ape_test)
        return
    setup_isolation = getattr(runner, "_setup_isolation", None)
    connect = getattr(runner, "_connect", None)
    track_fixture_blocks = getattr(runner, "_track_fixture_blocks", None)
    if setup_isolation is None or connect is None or track_fixture_blocks is None:
        warnings.warn(
            "ape's test runner changed: every test now runs with ape's chain isolation",
            stacklevel=1,
        )
        return
    state = {"ape_tests_collected": False}

    def _setup_isolation(item: pytest.Item) -> None:
        if uses_ape(item):
            setup_isolation(item)

    def _connect() -> None:
        if state["ape_tests_collected"]:
            connect()

    def _track_fixture_blocks(fixture_name: str) -> bool:
        # ape inspects its provider here, which fails when it never connected.
        return state["ape_tests_collected"] and track_fixture_blocks(fixture_name)

    runner._setup_isolation = _setup_isolation
    runner._connect = _connect
    runner._track_fixture_blocks = _track_fixture_blocks
    config.stash[_APE_STATE] = state


def pytest_collection_finish(session: pytest.Session) -> None:
    # Runs before ape's hook wrapper connects (after deselection by -k/-m).
    if (state := session.config.stash.get(_APE_STATE, None)) is not None:
        state["ape_tests_collected"] = any(uses_ape(item) for item in session.items)
