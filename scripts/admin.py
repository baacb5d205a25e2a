"""Escrow owner's commands: `ape run admin <command> --network ... --account <owner>`.

operator ADDRESS [--remove] | fee BPS | pause | unpause | withdraw-fees AMOUNT --to ADDR | status
"""

from __future__ import annotations

from typing import Any

import click
from ape.cli import ConnectedProviderCommand, account_option

from scripts._common import (
    ADDRESS,
    USDC,
    confirm,
    connected_deployment_path,
    escrow_contract,
    load_deployment,
    require_owner,
    reverts_as_click_errors,
    usdc_contract,
    usdc_text,
    yes_option,
)


@click.group()
def cli() -> None:
    """Administer the Quotra escrow (owner only, except `status`)."""


@cli.command(cls=ConnectedProviderCommand)
@account_option()
@click.argument("address", type=ADDRESS)
@click.option("--remove", is_flag=True, help="Remove the role instead of granting it.")
@yes_option
def operator(account: Any, address: str, remove: bool, yes: bool) -> None:
    """Grant (or --remove) the operator role: the relay's settling key."""
    deployment = load_deployment()
    escrow = escrow_contract(deployment)
    require_owner(escrow, account)
    confirm(yes, f"{'Remove' if remove else 'Grant'} operator {address}?")
    with reverts_as_click_errors("set_operator"):
        escrow.set_operator(address, not remove, sender=account)
    deployment.with_operator(address, not remove).save(connected_deployment_path())
    click.echo(f"operator {address}: {'removed' if remove else 'granted'}")


@cli.command(cls=ConnectedProviderCommand)
@account_option()
@click.argument("bps", type=click.IntRange(0, 10_000))
@yes_option
def fee(account: Any, bps: int, yes: bool) -> None:
    """Set the platform fee in basis points (1000 = 10%), at most the contract's MAX_FEE_BPS."""
    deployment = load_deployment()
    escrow = escrow_contract(deployment)
    cap = escrow.MAX_FEE_BPS()
    if bps > cap:
        raise click.BadParameter(f"{bps} is above the cap of {cap} bps", param_hint="BPS")
    require_owner(escrow, account)
    confirm(yes, f"Set the fee from {escrow.fee_bps()} to {bps} bps?")
    with reverts_as_click_errors("set_fee_bps"):
        escrow.set_fee_bps(bps, sender=account)
    deployment.model_copy(update={"fee_bps": bps}).save(connected_deployment_path())
    click.echo(f"fee: {bps} bps")


@cli.command(cls=ConnectedProviderCommand)
@account_option()
@yes_option
def pause(account: Any, yes: bool) -> None:
    """Stop deposits and settlements (claims, withdrawals and refunds keep working)."""
    escrow = escrow_contract(load_deployment())
    require_owner(escrow, account)
    if escrow.paused():
        raise click.UsageError("the escrow is already paused")
    confirm(yes, "Pause the escrow?")
    with reverts_as_click_errors("pause"):
        escrow.pause(sender=account)
    click.echo("paused")


@cli.command(cls=ConnectedProviderCommand)
@account_option()
@yes_option
def unpause(account: Any, yes: bool) -> None:
    """Lift the pause."""
    escrow = escrow_contract(load_deployment())
    require_owner(escrow, account)
    if not escrow.paused():
        raise click.UsageError("the escrow is not paused")
    confirm(yes, "Unpause the escrow?")
    with reverts_as_click_errors("unpause"):
        escrow.unpause(sender=account)
    click.echo("unpaused")


@cli.command("withdraw-fees", cls=ConnectedProviderCommand)
@account_option()
@click.argument("amount", type=USDC)
@click.option("--to", "to", type=ADDRESS, required=True, help="Receiver of the fees.")
@yes_option
def withdraw_fees(account: Any, amount: int, to: str, yes: bool) -> None:
    """Pay out AMOUNT USDC (like 12.50) of the accumulated platform fees."""
    escrow = escrow_contract(load_deployment())
    available = escrow.platform_fees()
    if amount > available:
        raise click.BadParameter(
            f"{usdc_text(amount)} is more than the platform fees ({usdc_text(available)})",
            param_hint="AMOUNT",
        )
    require_owner(escrow, account)
    confirm(yes, f"Send {usdc_text(amount)} of platform fees to {to}?")
    with reverts_as_click_errors("withdraw_platform_fees"):
        escrow.withdraw_platform_fees(to, amount, sender=account)
    click.echo(f"sent {usdc_text(amount)} to {to}")


@cli.command(cls=ConnectedProviderCommand)
def status() -> None:
    """Print the escrow's state: fee, operators, pause, liabilities and balance."""
    deployment = load_deployment()
    escrow = escrow_contract(deployment)
    usdc = usdc_contract(deployment.usdc)
    balance, liabilities = usdc.balanceOf(escrow.address), escrow.liabilities()
    rows = [
        ("escrow", f"{escrow.address} (chain {deployment.chain_id}, block {deployment.block})"),
        ("usdc", f"{deployment.usdc} ({deployment.usdc_name} v{deployment.usdc_version})"),
        ("owner", escrow.owner()),
        ("fee", f"{escrow.fee_bps()} bps (cap {escrow.MAX_FEE_BPS()})"),
        ("paused", str(escrow.paused())),
        ("balance", usdc_text(balance)),
        ("liabilities", usdc_text(liabilities)),
        ("  deposits", usdc_text(escrow.total_deposits())),
        ("  earnings", usdc_text(escrow.total_earnings())),
        ("  platform fees", usdc_text(escrow.platform_fees())),
        ("excess", usdc_text(balance - liabilities)),
        ("withdrawal delay", f"{escrow.withdrawal_delay()} s"),
        ("refund window", f"{escrow.refund_window()} s"),
    ]
    rows += [
        (f"operator {i}", f"{op} ({'active' if escrow.is_operator(op) else 'REMOVED on chain'})")
        for i, op in enumerate(deployment.operators, 1)
    ] or [("operators", "(none recorded)")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")
