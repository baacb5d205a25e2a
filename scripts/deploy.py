"""Deploy the Quotra escrow: `ape run deploy escrow --network <ecosystem:network:provider> --account <alias>`.

Writes `deployments/<ecosystem>-<network>.json` (see `quotra.chain.deployment`). On the twin and on
local chains, MockUSDC is installed at the USDC address first if nothing is there yet, and so is
MetaMask's Delegation Framework (npm bytecode) at its Base Sepolia addresses; elsewhere the record
names MetaMask's own deployment of the framework on that chain.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
from ape.cli import ConnectedProviderCommand, account_option
from quotra.chain.deployment import (
    BASE_SEPOLIA_CHAIN_ID,
    BASE_SEPOLIA_USDC,
    KNOWN_USDC,
    LOCAL_CHAIN_IDS,
    DelegationFramework,
    Deployment,
    DeploymentError,
)

from scripts._common import (
    ADDRESS,
    Address,
    Duration,
    confirm,
    connected_deployment_path,
    is_anvil,
    reverts_as_click_errors,
    rpc,
    usdc_contract,
    yes_option,
)


@click.group()
def cli() -> None:
    """Deploy Quotra's contracts."""


def default_usdc(chain_id: int, is_local: bool) -> str | None:
    """Circle's USDC on Base and Base Sepolia; the Base Sepolia address on local chains (where
    MockUSDC gets installed); None for any other chain (`--usdc` is then required)."""
    if chain_id in KNOWN_USDC:
        return KNOWN_USDC[chain_id]
    if is_local or chain_id in LOCAL_CHAIN_IDS:
        return BASE_SEPOLIA_USDC
    return None


def install_mock_usdc(usdc: str, owner: str) -> None:
    """Install MockUSDC (owner and minter `owner`) at `usdc`, as the twin does."""
    from quotra_dev import twin

    creation_code, _abi = twin.load_mock_usdc()
    twin.place_contract(rpc, usdc, creation_code, owner)


def delegation_framework(chain_id: int, dev_chain: bool, owner: str) -> DelegationFramework | None:
    """MetaMask's Delegation Framework on this chain: on a dev chain installed from its npm
    bytecode at Base Sepolia's addresses if missing (as on the twin); elsewhere MetaMask's own
    deployment (`@metamask/delegation-deployments`), if it lists one whose code is there."""
    from ape import networks
    from quotra_dev import framework

    if dev_chain:
        return framework.install(rpc, owner)
    deployed = framework.deployed(chain_id)
    if deployed is None or not networks.provider.get_code(deployed.delegation_manager):
        click.echo(
            f"no Delegation Framework on chain {chain_id}: ERC-7710 claims and allowances are off", err=True
        )
        return None
    return deployed


def refuse_live_redeploy(force: bool) -> None:
    """Refuse to replace a recorded deployment whose escrow still has code on this chain."""
    from ape import chain, networks

    path = connected_deployment_path()
    if not path.exists():
        return
    try:
        previous = Deployment.load(path)
    except DeploymentError as exc:
        click.echo(f"warning: replacing {exc}", err=True)
        return
    live = previous.chain_id == chain.chain_id and bool(networks.provider.get_code(previous.escrow))
    if live and not force:
        raise click.UsageError(
            f"an escrow is already deployed at {previous.escrow} (recorded in {path}); "
            "pass --force to deploy a new one and replace the record"
        )
    if live:
        click.echo(f"--force: replacing the live deployment {previous.escrow} in {path}", err=True)


@cli.command(cls=ConnectedProviderCommand)
@account_option()
@click.option(
    "--withdrawal-delay",
    type=Duration(),
    default="24h",
    show_default=True,
    help="Wait between request-withdrawal and withdraw (seconds, or 30m / 24h / 7d).",
)
@click.option(
    "--refund-window",
    type=Duration(),
    default="24h",
    show_default=True,
    help="How long after an x402 authorization's validBefore an operator may refund it.",
)
@click.option(
    "--operator", "operators", type=ADDRESS, multiple=True, help="Grant the operator role (repeatable)."
)
@click.option(
    "--usdc", type=Address(), default=None, help="USDC address (default: the network's Circle USDC)."
)
@click.option("--force", is_flag=True, help="Deploy even if a live deployment is recorded for this network.")
@yes_option
def escrow(
    ecosystem: Any,
    network: Any,
    provider: Any,
    account: Any,
    withdrawal_delay: int,
    refund_window: int,
    operators: tuple[str, ...],
    usdc: str | None,
    force: bool,
    yes: bool,
) -> None:
    """Deploy QuotraEscrow and record it in deployments/<network>.json."""
    from ape import chain, project

    chain_id = provider.chain_id
    dev_chain = (
        network.is_local or chain_id in LOCAL_CHAIN_IDS or (chain_id == BASE_SEPOLIA_CHAIN_ID and is_anvil())
    )
    usdc = usdc or default_usdc(chain_id, dev_chain)
    if usdc is None:
        raise click.BadParameter(f"no known USDC on chain {chain_id}; pass --usdc", param_hint="--usdc")
    refuse_live_redeploy(force)

    install = not provider.get_code(usdc)
    if install and not dev_chain:
        raise click.BadParameter(f"no contract at {usdc} on chain {chain_id}", param_hint="--usdc")

    click.echo(
        f"network        {ecosystem.name}:{network.name} (chain {chain_id})\n"
        f"deployer/owner {account.address}\n"
        f"usdc           {usdc}{'  (MockUSDC will be installed here)' if install else ''}\n"
        f"withdrawal     {withdrawal_delay} s delay\n"
        f"refund window  {refund_window} s\n"
        f"operators      {', '.join(operators) or '(none)'}"
    )
    confirm(yes, "Deploy the escrow?")

    if install:
        install_mock_usdc(usdc, account.address)
        click.echo(f"installed MockUSDC at {usdc} (minter {account.address})")
    token = usdc_contract(usdc)
    usdc_name, usdc_version = token.name(), token.version()

    framework = delegation_framework(chain_id, dev_chain, account.address)
    with reverts_as_click_errors("deploy"):
        contract = account.deploy(project.QuotraEscrow, usdc, withdrawal_delay, refund_window)
    receipt = chain.get_receipt(contract.txn_hash)
    for operator in operators:
        with reverts_as_click_errors(f"set_operator({operator})"):
            contract.set_operator(operator, True, sender=account)

    deployment = Deployment(
        network=f"{ecosystem.name}:{network.name}",
        chain_id=chain_id,
        escrow=contract.address,
        usdc=usdc,
        usdc_name=usdc_name,
        usdc_version=usdc_version,
        owner=contract.owner(),
        operators=operators,
        block=receipt.block_number,
        tx_hash=receipt.txn_hash,
        fee_bps=contract.fee_bps(),
        withdrawal_delay=contract.withdrawal_delay(),
        refund_window=contract.refund_window(),
        deployed_at=datetime.fromtimestamp(chain.blocks[receipt.block_number].timestamp, UTC),
        delegation_framework=framework,
    )
    path = deployment.save(connected_deployment_path())
    click.echo(f"escrow {contract.address} deployed in block {receipt.block_number}; wrote {path}")
