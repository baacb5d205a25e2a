"""Consumer's commands: `ape run consumer <command> --network ... --account <alias>`.

deposit AMOUNT [--for ADDR] | request-withdrawal AMOUNT | cancel-withdrawal | withdraw |
sign-permission --allowance 5.00 --days 30 [--spender OPERATOR] [--developer ADDR --max-markup-bps N] |
revoke (--permission-file F | --digest D) | balance | sign-withdrawal (request AMOUNT | cancel |
withdraw --relayer-fee 0.01) [--valid-for 1h] | grant-allowance --period-amount 5.00 --period 1d
--days 30 [--operator ADDR]

`sign-withdrawal` signs a withdrawal step for the relay (`POST /v1/account/withdrawals`), which a
relayer submits: an exit without ETH. `grant-allowance` signs an ERC-7715 style periodic USDC
allowance (a Delegation Framework delegation; the account must be a MetaMask smart account) for
`POST /v1/account/allowances`: the relay tops the deposit up from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from ape.cli import ConnectedProviderCommand, account_option
from quotra.chain import delegation as dlg
from quotra.chain import eip712
from quotra_dev.chain import ZERO_ADDRESS, permission_tuple

from scripts._common import (
    ADDRESS,
    USDC,
    Duration,
    PositiveDays,
    UsdcAmount,
    confirm,
    echo_json,
    escrow_contract,
    head_timestamp,
    load_deployment,
    new_salt,
    require_framework,
    reverts_as_click_errors,
    revoke_signed_item,
    sign_framework_delegation,
    sign_typed,
    signed_item,
    usdc_contract,
    usdc_text,
    yes_option,
)


@click.group()
def cli() -> None:
    """Prepaid balance and spend permissions of a Quotra consumer."""


@cli.command(cls=ConnectedProviderCommand)
@account_option()
@click.argument("amount", type=USDC)
@click.option("--for", "beneficiary", type=ADDRESS, default=None, help="Credit another consumer (a grant).")
@yes_option
def deposit(account: Any, amount: int, beneficiary: str | None, yes: bool) -> None:
    """Deposit AMOUNT USDC (like 25.00) as prepaid balance: approve, then deposit."""
    deployment = load_deployment()
    escrow, usdc = escrow_contract(deployment), usdc_contract(deployment.usdc)
    beneficiary = beneficiary or account.address
    held = usdc.balanceOf(account.address)
    if amount > held:
        raise click.BadParameter(f"{account.address} holds only {usdc_text(held)}", param_hint="AMOUNT")
    if escrow.paused():
        raise click.UsageError("the escrow is paused: deposits are stopped")
    confirm(yes, f"Deposit {usdc_text(amount)} for {beneficiary}?")
    if usdc.allowance(account.address, escrow.address) < amount:
        with reverts_as_click_errors("approve"):
            usdc.approve(escrow.address, amount, sender=account)
    with reverts_as_click_errors("deposit"):
        escrow.deposit(amount, beneficiary, sender=account)
    click.echo(
        f"deposited {usdc_text(amount)} for {beneficiary}; balance {usdc_text(escrow.deposits(beneficiary))}"
    )


@cli.command("request-withdrawal", cls=ConnectedProviderCommand)
@account_option()
@click.argument("amount", type=USDC)
@yes_option
def request_withdrawal(account: Any, amount: int, yes: bool) -> None:
    """Start withdrawing AMOUNT of the deposit (possible after the withdrawal delay)."""
    escrow = escrow_contract(load_deployment())
    deposited = escrow.deposits(account.address)
    if amount > deposited:
        raise click.BadParameter(f"the deposit is only {usdc_text(deposited)}", param_hint="AMOUNT")
    confirm(yes, f"Request a withdrawal of {usdc_text(amount)} (replaces any pending one)?")
    with reverts_as_click_errors("request_withdrawal"):
        escrow.request_withdrawal(amount, sender=account)
    amount_pending, unlock_at = escrow.withdrawals(account.address)
    click.echo(f"withdrawal of {usdc_text(amount_pending)} unlocks at timestamp {unlock_at}")


@cli.command("cancel-withdrawal", cls=ConnectedProviderCommand)
@account_option()
def cancel_withdrawal(account: Any) -> None:
    """Cancel the pending withdrawal."""
    escrow = escrow_contract(load_deployment())
    if escrow.withdrawals(account.address)[0] == 0:
        raise click.UsageError("no pending withdrawal")
    with reverts_as_click_errors("cancel_withdrawal"):
        escrow.cancel_withdrawal(sender=account)
    click.echo("withdrawal cancelled")


@cli.command(cls=ConnectedProviderCommand)
@account_option()
def withdraw(account: Any) -> None:
    """Complete the pending withdrawal once unlocked."""
    escrow = escrow_contract(load_deployment())
    amount, unlock_at = escrow.withdrawals(account.address)
    if amount == 0:
        raise click.UsageError("no pending withdrawal: run request-withdrawal first")
    now = head_timestamp()
    if now < unlock_at:
        raise click.UsageError(f"the withdrawal unlocks in {unlock_at - now} s")
    with reverts_as_click_errors("withdraw"):
        receipt = escrow.withdraw(sender=account)
    paid = receipt.return_value if isinstance(receipt.return_value, int) else amount
    click.echo(f"withdrew {usdc_text(paid)}")


@cli.command(cls=ConnectedProviderCommand)
@account_option()
def balance(account: Any) -> None:
    """Print the account's deposit, pending withdrawal and wallet USDC."""
    deployment = load_deployment()
    escrow, usdc = escrow_contract(deployment), usdc_contract(deployment.usdc)
    pending, unlock_at = escrow.withdrawals(account.address)
    click.echo(f"deposit             {usdc_text(escrow.deposits(account.address))}")
    click.echo(
        f"pending withdrawal  {usdc_text(pending)}" + (f" (unlocks at {unlock_at})" if pending else "")
    )
    click.echo(f"wallet              {usdc_text(usdc.balanceOf(account.address))}")


@cli.command("sign-permission", cls=ConnectedProviderCommand)
@account_option()
@click.option("--allowance", type=USDC, required=True, help="Most the spender may charge, e.g. 5.00.")
@click.option("--days", "duration", type=PositiveDays(), default="30", show_default=True, help="Validity.")
@click.option(
    "--spender", type=ADDRESS, default=None, help="The relay operator (default: the first recorded)."
)
@click.option(
    "--developer", type=ADDRESS, default=None, help="An app developer the charges may pay a markup."
)
@click.option(
    "--max-markup-bps",
    type=click.IntRange(0, 100_000),
    default=0,
    show_default=True,
    help="The most markup, in basis points of the calls' base cost (2000 = 20%).",
)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None)
def sign_permission(
    account: Any,
    allowance: int,
    duration: int,
    spender: str | None,
    developer: str | None,
    max_markup_bps: int,
    output: Path | None,
) -> None:
    """Sign a SpendPermission (no transaction) and print it as JSON for the relay. With
    --developer and --max-markup-bps it lets that app developer's markup be charged on top."""
    if max_markup_bps and developer is None:
        raise click.BadOptionUsage("--developer", "a markup needs the --developer it is paid to")
    deployment = load_deployment()
    if spender is None:
        if not deployment.operators:
            raise click.BadParameter(
                "no operator recorded in the deployment; pass --spender", param_hint="--spender"
            )
        spender = deployment.operators[0]
    now = head_timestamp()
    message = {
        "consumer": account.address,
        "spender": spender,
        "allowance": allowance,
        "valid_after": now,
        "valid_until": now + duration,
        "salt": new_salt(),
        "developer": developer or ZERO_ADDRESS,
        "max_markup_bps": max_markup_bps,
    }
    signature = sign_typed(account, deployment.escrow_domain, "SpendPermission", message)
    echo_json(signed_item(deployment, "SpendPermission", message, signature), output)


@cli.command(cls=ConnectedProviderCommand)
@account_option()
@click.option(
    "--permission-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A permission printed by sign-permission.",
)
@click.option("--digest", default=None, help="Or the permission's EIP-712 digest (0x + 64 hex).")
@yes_option
def revoke(account: Any, permission_file: Path | None, digest: str | None, yes: bool) -> None:
    """Revoke a spend permission on-chain (no charge settles under it afterwards)."""
    revoke_signed_item(
        account,
        permission_file,
        digest,
        primary="SpendPermission",
        signer_field="consumer",
        revoke_method="revoke_permission",
        to_tuple=permission_tuple,
        yes=yes,
    )


# step -> (EIP-712 primary type, its amount field)
WITHDRAWAL_STEPS = {
    "request": ("RequestWithdrawal", "amount"),
    "cancel": ("CancelWithdrawal", "amount"),
    "withdraw": ("Withdraw", "relayer_fee"),
}


@cli.command("sign-withdrawal", cls=ConnectedProviderCommand)
@account_option()
@click.argument("step", type=click.Choice(sorted(WITHDRAWAL_STEPS)))
@click.argument("amount", type=USDC, required=False)
@click.option("--relayer-fee", type=UsdcAmount(allow_zero=True), default="0", show_default=True)
@click.option("--valid-for", "duration", type=Duration(), default="1h", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None)
def sign_withdrawal(
    account: Any, step: str, amount: int | None, relayer_fee: int, duration: int, output: Path | None
) -> None:
    """Sign a withdrawal STEP (request AMOUNT, cancel, or withdraw paying --relayer-fee out of it)
    for a relayer to submit (no transaction, no ETH). Prints the body of POST /v1/account/withdrawals."""
    deployment = load_deployment()
    escrow = escrow_contract(deployment)
    primary, field = WITHDRAWAL_STEPS[step]
    pending, _unlock_at = escrow.withdrawals(account.address)
    if step == "request":
        if amount is None or amount > escrow.deposits(account.address):
            raise click.BadParameter("give an AMOUNT up to the deposit", param_hint="AMOUNT")
        value = amount
    elif pending == 0:
        raise click.UsageError("no pending withdrawal: sign a request first")
    else:
        value = pending if step == "cancel" else relayer_fee
    message = {
        "consumer": account.address,
        field: value,
        "nonce": escrow.withdrawal_nonces(account.address),
        "deadline": head_timestamp() + duration,
    }
    signature = sign_typed(account, deployment.escrow_domain, primary, message)
    typed = eip712.typed_data(deployment.escrow_domain, primary, message)["message"]
    echo_json({"step": step, "message": typed, "signature": signature.hex}, output)


@cli.command("grant-allowance", cls=ConnectedProviderCommand)
@account_option()
@click.option("--period-amount", type=USDC, required=True, help="Most the relay may take per period.")
@click.option("--period", "period", type=Duration(), default="1d", show_default=True)
@click.option("--days", "duration", type=PositiveDays(), default="30", show_default=True, help="Validity.")
@click.option(
    "--operator", type=ADDRESS, default=None, help="The relay's operator (default: the deployment's)."
)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None)
def grant_allowance(
    account: Any, period_amount: int, period: int, duration: int, operator: str | None, output: Path | None
) -> None:
    """Sign a periodic USDC allowance to the relay's operator, shaped as MetaMask's ERC-7715
    `erc20-token-periodic` permission (no transaction). Prints the body of POST /v1/account/allowances."""
    deployment = load_deployment()
    fw = require_framework(deployment)
    if operator is None:
        if not deployment.operators:
            raise click.UsageError("the deployment names no operator: pass --operator")
        operator = deployment.operators[0]
    if period <= 0:
        raise click.BadParameter("the period must be positive", param_hint="--period")
    now = head_timestamp()
    grant = dlg.periodic_allowance(
        fw, consumer=account.address, delegate=operator, usdc=deployment.usdc, period_amount=period_amount,
        period_duration=period, start=now, expiry=now + duration, salt=new_salt(),
    )  # fmt: skip
    signed = sign_framework_delegation(account, deployment, grant)
    context = dlg.encode_context([grant.signed(bytes.fromhex(signed["signature"][2:]))])
    response = {
        "chainId": hex(deployment.chain_id),
        "context": "0x" + context.hex(),
        "delegationManager": fw.delegation_manager,
        "permission": {
            "type": "erc20-token-periodic",
            "data": {
                "tokenAddress": deployment.usdc,
                "periodAmount": hex(period_amount),
                "periodDuration": period,
                "startTime": now,
            },
        },
        "expiry": now + duration,
    }
    echo_json(response, output)
