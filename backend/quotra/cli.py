"""The `quotra` command: a plain click group; other parts of the project add their commands."""

from __future__ import annotations

import asyncio
import secrets
import sys

import click
from pydantic import ValidationError

from quotra.config import ConfigError, Settings, decode_master_key, master_key_id
from quotra.logging import configure_logging


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        messages = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise click.ClickException(f"configuration refused: {messages}") from exc


@click.group()
@click.version_option(package_name="quotra")
def main() -> None:
    """Quotra: the relay and its tools."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--proxy-headers/--no-proxy-headers", default=False, help="Trust X-Forwarded-* from a proxy")
def serve(host: str, port: int, proxy_headers: bool) -> None:
    """Run the relay (migrations are applied at start)."""
    import uvicorn

    from quotra.app import create_app

    settings = load_settings()
    configure_logging(settings.log_level, json_logs=settings.log_json)
    try:
        settings.load_keyring()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    app = create_app(settings)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        proxy_headers=proxy_headers,
        access_log=False,
        server_header=False,
    )


@main.group()
def db() -> None:
    """Database tasks."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply the Alembic migrations."""
    from quotra.store.db import create_engine, upgrade

    settings = load_settings()
    configure_logging(settings.log_level, json_logs=settings.log_json)

    async def run() -> None:
        engine = create_engine(settings.effective_database_url)
        try:
            await upgrade(engine, revision)
        finally:
            await engine.dispose()

    asyncio.run(run())
    click.echo(f"database at {revision}")


@main.group()
def keys() -> None:
    """Master-key tasks."""


@keys.command("rotate")
@click.option(
    "--new-key",
    envvar="QUOTRA_NEW_MASTER_KEY",
    default=None,
    help="The new master key (32 bytes, hex or base64); generated when omitted",
)
def keys_rotate(new_key: str | None) -> None:
    """Re-wrap every listing's data key with a new master key.

    The current key (QUOTRA_MASTER_KEY, plus QUOTRA_PREVIOUS_MASTER_KEYS) must open every key.
    In dev mode the new key replaces data/master.key; otherwise set it as QUOTRA_MASTER_KEY."""
    from quotra.services.listings import REVOKED_SEAL
    from quotra.store.db import create_engine, upgrade
    from quotra.store.repositories import Store
    from quotra.vault import Vault

    settings = load_settings()
    configure_logging(settings.log_level, json_logs=settings.log_json)
    try:
        keyring, _ = settings.load_keyring()
        new = decode_master_key(new_key) if new_key else secrets.token_bytes(32)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    new_id = master_key_id(new)
    vault = Vault({**keyring, new_id: new}, new_id)

    def rewrap(listing_id: str, sealed: str) -> str | None:
        if sealed == REVOKED_SEAL or not vault.needs_rewrap(sealed):
            return None
        return vault.rewrap(listing_id, sealed)

    async def run() -> int:
        engine = create_engine(settings.effective_database_url)
        try:
            await upgrade(engine)
            return await Store(engine).rewrap_keys(rewrap)
        finally:
            await engine.dispose()

    count = asyncio.run(run())
    click.echo(f"re-wrapped {count} listing key(s) with master key {new_id}")
    if settings.uses_dev_master_key:
        path = settings.write_dev_master_key(new)
        click.echo(f"dev mode: the new master key is stored in {path}")
    elif not new_key:
        click.echo("Set this as QUOTRA_MASTER_KEY (and keep the old one in QUOTRA_PREVIOUS_MASTER_KEYS until")
        click.echo("every replica has restarted):", err=False)
        click.echo(new.hex())
    else:
        click.echo("Now set QUOTRA_MASTER_KEY to the new key on every replica.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


@main.command()
def demo() -> None:
    """Tell Quotra's story on a local Base Sepolia twin (what `make demo` runs)."""
    from quotra.demo import main as run_demo

    raise SystemExit(run_demo())
