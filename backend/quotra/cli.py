"""The `quotra` command: a plain click group; other parts of the project add their commands."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
from collections.abc import AsyncIterator
from importlib.metadata import entry_points
from typing import Any

import click
from pydantic import ValidationError

from quotra.chain.relayer import RelayerError
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
        loop="uvloop",
        http="httptools",
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


@contextlib.asynccontextmanager
async def _payments_runtime(settings: Settings) -> AsyncIterator[Any]:
    """The payments service of a one-off command (no background tasks), on a migrated database."""
    from quotra.calls.outbox import Outbox
    from quotra.calls.store import CallStore
    from quotra.metrics import Metrics
    from quotra.payments.service import Payments
    from quotra.store.db import create_engine, upgrade
    from quotra.store.repositories import Store
    from quotra.store.transactions import Transactions

    engine = create_engine(settings.effective_database_url)
    transactions = Transactions(engine)
    try:
        await upgrade(engine)
        calls, outbox = CallStore(engine, transactions), Outbox(engine, transactions)
        payments = Payments(settings, Store(engine), Metrics(), calls=calls, outbox=outbox)
        if not payments.configured:
            raise click.ClickException(
                "needs the chain and the escrow: QUOTRA_CHAIN_RPC_URL and QUOTRA_ESCROW_ADDRESS "
                "(or QUOTRA_DEPLOYMENT_FILE)"
            )
        await payments.start(background=False)
        try:
            yield payments
        finally:
            await payments.stop()
    finally:
        await transactions.close()
        await engine.dispose()


@main.command()
@click.option("--once/--loop", default=True, show_default=True, help="One pass, or run until Ctrl-C")
def settle(once: bool) -> None:
    """Settle captured payments into the escrow now (what the relay's worker does in the background).

    Takes the settlement leadership first: refuses while a relay of this database is settling."""
    import dataclasses

    settings = load_settings()
    configure_logging(settings.log_level, json_logs=settings.log_json)

    async def run() -> None:
        async with _payments_runtime(settings) as payments:
            worker = payments.worker
            if worker is None:
                raise click.ClickException("settling needs QUOTRA_OPERATOR_KEY (or a keystore)")
            if once:
                worker.config = dataclasses.replace(worker.config, max_age=0.0)  # flush everything due
                assert worker.lock is not None
                if not await worker.lock.acquire():
                    raise click.ClickException("another process is the settlement leader of this database")
                try:
                    await worker.tick()
                    await worker.tick()  # follows what the first pass sent
                finally:
                    await worker.lock.release()
            else:
                await worker.run(asyncio.Event())

    asyncio.run(run())
    click.echo("settlement pass done")


@main.command()
def reconcile() -> None:
    """Compare the calls with the escrow's events from its first block; exit 1 on any discrepancy.

    Credits the relay had not recorded yet (a crash between sending and writing down) are recorded."""
    settings = load_settings()
    configure_logging(settings.log_level, json_logs=settings.log_json)

    async def run() -> list[Any]:
        async with _payments_runtime(settings) as payments:
            assert payments.indexer is not None
            found: list[Any] = await payments.indexer.full_check()
            return found

    found = asyncio.run(run())
    for item in found:
        click.echo(str(item))
    click.echo(f"{len(found)} discrepancies")
    if found:
        raise SystemExit(1)


@main.command()
@click.argument("call_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation")
def refund(call_id: str, yes: bool) -> None:
    """Refund a settled x402 call's payment to its payer through the escrow (an operator action:
    out of the provider's unclaimed share and the platform fee, within the escrow's refund window)."""
    settings = load_settings()
    configure_logging(settings.log_level, json_logs=settings.log_json)
    if not yes:
        click.confirm(f"Refund the payment of {call_id} to its payer?", abort=True)

    async def run() -> str:
        async with _payments_runtime(settings) as payments:
            if payments.worker is None:
                raise click.ClickException("refunding needs QUOTRA_OPERATOR_KEY (or a keystore)")
            try:
                tx_hash: str = await payments.worker.refund(call_id)
            except RelayerError as exc:
                raise click.ClickException(str(exc)) from exc
            return tx_hash

    click.echo(f"refunded in {asyncio.run(run())}")


def _add_plugin_commands() -> None:
    """Commands other installed parts of the project add (`quotra_dev`: demo, relayer), declared
    as `quotra.commands` entry points; the relay itself never imports them."""
    for entry in entry_points(group="quotra.commands"):
        main.add_command(entry.load(), entry.name)


_add_plugin_commands()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
