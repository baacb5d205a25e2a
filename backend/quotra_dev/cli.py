"""Dev commands the `quotra` command gains when this package is installed (entry points in
pyproject.toml): `quotra demo` (the whole marketplace on the twin) and `quotra relayer` (the local
gas relayer). The relay never imports this package."""

from __future__ import annotations

from pathlib import Path

import click
from quotra.logging import configure_logging


@click.command()
@click.option("--keep", is_flag=True, help="Leave everything running and print the URLs and keys to try")
@click.option("--chain-only", is_flag=True, help="Only the escrow's part, straight against the contracts")
def demo(keep: bool, chain_only: bool) -> None:
    """The whole marketplace on a local Base Sepolia twin (what `make demo` runs)."""
    from quotra_dev.demo import main as run_demo

    raise SystemExit(run_demo(keep=keep, chain_only=chain_only))


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9545, show_default=True, type=int)
@click.option(
    "--rpc-url",
    envvar=["QUOTRA_RELAYER_RPC_URL", "QUOTRA_CHAIN_RPC_URL"],
    required=True,
    help="The chain's JSON-RPC URL (env QUOTRA_RELAYER_RPC_URL or QUOTRA_CHAIN_RPC_URL)",
)
@click.option("--chain-id", envvar="QUOTRA_CHAIN_ID", default=84532, show_default=True, type=int)
@click.option(
    "--deployment",
    "deployment_file",
    envvar="QUOTRA_DEPLOYMENT_FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="deployments/<network>.json: the escrow (and USDC) to relay for",
)
@click.option("--escrow", default=None, help="The escrow address, instead of (or besides) --deployment")
@click.option(
    "--fee", envvar="QUOTRA_RELAYER_FEE", default="0.01", show_default=True, help="Minimum fee in USDC"
)
@click.option(
    "--webhook-format",
    envvar="QUOTRA_RELAYER_WEBHOOK_FORMAT",
    type=click.Choice(["oneshot", "standard"]),
    default="oneshot",
    show_default=True,
)
def relayer(
    host: str,
    port: int,
    rpc_url: str,
    chain_id: int,
    deployment_file: Path | None,
    escrow: str | None,
    fee: str,
    webhook_format: str,
) -> None:
    """Run the local gas relayer for the twin (1Shot-style JSON-RPC, Ed25519-signed webhooks).

    The gas key comes from $QUOTRA_RELAYER_KEY only (a dev account key on the twin; never a file
    or an argument); the webhook key from $QUOTRA_RELAYER_ED25519_KEY (32-byte seed, hex or
    base64), generated at start when unset."""
    import uvicorn

    from quotra_dev.relayer import config_from_env, create_relayer_app

    configure_logging("INFO", json_logs=False)
    try:
        config = config_from_env(
            rpc_url=rpc_url,
            chain_id=chain_id,
            deployment=deployment_file,
            escrow=escrow,
            fee=fee,
            webhook_format="standard" if webhook_format == "standard" else "oneshot",
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"relayer {config.gas_account.address} on chain {chain_id}, webhook kid {config.signer.kid}, "
        f"JSON-RPC at http://{host}:{port}/",
        err=True,
    )
    app = create_relayer_app(config)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, server_header=False)
