"""Settings (dev defaults, production refusals) and the `quotra` CLI (db upgrade, keys rotate)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from quotra.cli import main
from quotra.config import Settings, master_key_id
from quotra.store.db import create_engine
from quotra.store.repositories import Store
from quotra.vault import Vault
from relay_helpers import MASTER_KEY


def test_dev_mode_defaults_to_sqlite_and_a_generated_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.env == "dev"
    assert settings.effective_database_url == f"sqlite+aiosqlite:///{tmp_path / 'data' / 'quotra.db'}"
    with caplog.at_level(logging.WARNING):
        keys, primary = settings.load_keyring()
    assert (tmp_path / "data" / "master.key").stat().st_mode & 0o777 == 0o600
    assert "dev mode" in caplog.text
    assert settings.load_keyring() == (keys, primary)  # kept, not regenerated


def test_env_and_dotenv_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("QUOTRA_CHAIN_ID=8453\nQUOTRA_UPSTREAM_ALLOWLIST=localhost, 10.0.0.0/8\n")
    monkeypatch.setenv("QUOTRA_MAX_BODY_BYTES", "4096")
    settings = Settings()
    assert settings.chain_id == 8453 and settings.max_body_bytes == 4096
    assert settings.upstream_allowlist == ["localhost", "10.0.0.0/8"]


@pytest.mark.parametrize("key", [None, "", "changeme", "0" * 64, "placeholder-secret", "abcd"])
def test_production_refuses_missing_or_placeholder_master_key(key: str | None) -> None:
    values = {"env": "production"} | ({} if key is None else {"master_key": key})
    with pytest.raises(ValidationError, match="QUOTRA_MASTER_KEY"):
        Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_production_accepts_a_real_key() -> None:
    settings = Settings(_env_file=None, env="production", master_key=MASTER_KEY)  # type: ignore[call-arg]
    keys, primary = settings.load_keyring()
    assert list(keys) == [primary]


def test_serve_refuses_to_start_in_production_without_a_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUOTRA_ENV", "production")
    result = CliRunner().invoke(main, ["serve", "--port", "1"])
    assert result.exit_code != 0
    assert "configuration refused" in result.output and "QUOTRA_MASTER_KEY" in result.output


def test_db_upgrade_and_keys_rotate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'q.db'}"
    monkeypatch.setenv("QUOTRA_DATABASE_URL", url)
    monkeypatch.setenv("QUOTRA_MASTER_KEY", MASTER_KEY)
    monkeypatch.setenv("QUOTRA_LOG_JSON", "false")
    runner = CliRunner()
    upgraded = runner.invoke(main, ["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    old_key = bytes.fromhex(MASTER_KEY)
    old = Vault.from_key(old_key)

    async def add_listing() -> None:
        engine = create_engine(url)
        store = Store(engine)
        await store.create_listing(
            id="lst_rot",
            owner="0x" + "11" * 20,
            kind="openai",
            base_url=None,
            models=["m"],
            api_key_sealed=old.seal("lst_rot", "sk-rotate-me"),
            price_per_call=1000,
            price_input_per_mtok=None,
            price_output_per_mtok=None,
            max_calls=None,
            calls_used=0,
            max_input_chars=None,
            max_input_tokens=None,
            max_output_tokens=None,
            rate_per_minute=None,
            expires_at=None,
            status="active",
            failure_streak=0,
            cooldown_until=None,
        )
        await engine.dispose()

    async def sealed() -> str:
        engine = create_engine(url)
        listing = await Store(engine).get_listing("lst_rot")
        await engine.dispose()
        assert listing is not None
        return listing.api_key_sealed

    asyncio.run(add_listing())
    new_key = "ab" * 32
    rotated = runner.invoke(main, ["keys", "rotate", "--new-key", new_key])
    assert rotated.exit_code == 0, rotated.output
    assert "re-wrapped 1 listing key(s)" in rotated.output
    assert new_key not in rotated.output
    text = asyncio.run(sealed())
    assert Vault.from_key(bytes.fromhex(new_key)).open("lst_rot", text) == "sk-rotate-me"
    assert text.split(".")[1] == master_key_id(bytes.fromhex(new_key))
    # with the old key gone, rotating again (from the wrong key) fails without changing anything
    monkeypatch.setenv("QUOTRA_MASTER_KEY", "cd" * 32)
    failed = runner.invoke(main, ["keys", "rotate"])
    assert failed.exit_code != 0
    assert asyncio.run(sealed()) == text


def test_dev_mode_rotation_replaces_the_key_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    first = runner.invoke(main, ["db", "upgrade"])
    assert first.exit_code == 0, first.output
    Settings(_env_file=None).load_keyring()  # type: ignore[call-arg]
    before = (tmp_path / "data" / "master.key").read_text()
    rotated = runner.invoke(main, ["keys", "rotate"])
    assert rotated.exit_code == 0, rotated.output
    after = (tmp_path / "data" / "master.key").read_text()
    assert after != before and "data/master.key" in rotated.output
