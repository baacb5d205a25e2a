"""Provider's commands: `ape run provider <command> --network ... --account <alias>`.

claim AMOUNT [--to ADDR] | sign-delegation --max 10.00 --relayer-fee 0.05 --days 7 [--payee ADDR]
[--delegate ADDR] | revoke (--delegation-file F | --digest D) | earnings [ADDRESS] |
sign-erc7710 --max 10.00 --relayer ADDR --relayer-fee 0.01 [--hours 1] [--payee ADDR] |
disable-erc7710 --claim-file F [--relayer ADDR]

The `*-erc7710` commands are for a provider whose account is a MetaMask smart account (EIP-7702):
they sign Delegation Framework delegations (ERC-7710) for the relay's
`POST /v1/provider/claims/erc7710` and `POST /v1/provider/claims/{id}/disable`, with no ETH.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from ape.cli import ConnectedProviderCommand, account_option
from quotra.chain import delegation as dlg
from quotra_dev.chain import ZERO_ADDRESS, delegation_tuple

from scripts._common import (
    ADDRESS,
    USDC,
    Duration,
    PositiveDays,
    UsdcAmount,
    confirm,
    echo_json,
    eip7702_upgrade,
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
    """Earnings, claims and claim delegations of a Quotra provider."""


@cli.command(cls=ConnectedProviderCommand)
@account_option()
@click.argument("amount", type=USDC)
@click.option("--to", "payee", type=ADDRESS, default=None, help="Receiver (default: the provider itself).")
@yes_option
def claim(account: Any, amount: int, payee: str | None, yes: bool) -> None:
    """Claim AMOUNT USDC (like 4.50) of the account's earnings."""
    deployment = load_deployment()
    escrow = escrow_contract(deployment)
    payee = payee or account.address
    earned = escrow.earnings(account.address)
    if amount > earned:
        raise click.BadParameter(f"the earnings are only {usdc_text(earned)}", param_hint="AMOUNT")
    confirm(yes, f"Claim {usdc_text(amount)} to {payee}?")
    with reverts_as_click_errors("claim"):
        escrow.claim(amount, payee, sender=account)
    click.echo(f"claimed {usdc_text(amount)} to {payee}; {usdc_text(escrow.earnings(account.address))} left")


@cli.command(cls=ConnectedProviderCommand)
@account_option(prompt=False)
@click.argument("address", type=ADDRESS, required=False)
def earnings(account: Any, address: str | None) -> None:
    """Print the unclaimed earnings of ADDRESS (default: the --account)."""
    if address is None:
        if account is None:
            raise click.UsageError("pass ADDRESS or --account")
        address = account.address
    deployment = load_deployment()
    escrow, usdc = escrow_contract(deployment), usdc_contract(deployment.usdc)
    click.echo(f"earnings  {usdc_text(escrow.earnings(address))}")
    click.echo(f"wallet    {usdc_text(usdc.balanceOf(address))}")


@cli.command("sign-delegation", cls=ConnectedProviderCommand)
@account_option()
@click.option("--max", "max_amount", type=USDC, required=True, help="Most that may be claimed in total.")
@click.option(
    "--relayer-fee",
    type=UsdcAmount(allow_zero=True),
    default="0",
    show_default=True,
    help="The relayer's fee for claiming all of --max, out of the claimed amount; a partial claim "
    "pays it pro rata, so the relayer never gets more however it splits the claims.",
)
@click.option("--days", "duration", type=PositiveDays(), default="7", show_default=True, help="Validity.")
@click.option("--payee", type=ADDRESS, default=None, help="Receiver of the claims (default: the provider).")
@click.option("--delegate", type=ADDRESS, default=None, help="The only allowed submitter (default: anyone).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None)
def sign_delegation(
    account: Any,
    max_amount: int,
    relayer_fee: int,
    duration: int,
    payee: str | None,
    delegate: str | None,
    output: Path | None,
) -> None:
    """Sign a claim Delegation (no transaction) and print it as JSON for a relayer."""
    if relayer_fee >= max_amount:
        raise click.BadParameter("the relayer fee must be below --max", param_hint="--relayer-fee")
    deployment = load_deployment()
    message = {
        "provider": account.address,
        "delegate": delegate or ZERO_ADDRESS,
        "payee": payee or account.address,
        "max_amount": max_amount,
        "relayer_fee": relayer_fee,
        "valid_until": head_timestamp() + duration,
        "salt": new_salt(),
    }
    signature = sign_typed(account, deployment.escrow_domain, "Delegation", message)
    echo_json(signed_item(deployment, "Delegation", message, signature), output)


@cli.command(cls=ConnectedProviderCommand)
@account_option()
@click.option(
    "--delegation-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A delegation printed by sign-delegation.",
)
@click.option("--digest", default=None, help="Or the delegation's EIP-712 digest (0x + 64 hex).")
@yes_option
def revoke(account: Any, delegation_file: Path | None, digest: str | None, yes: bool) -> None:
    """Revoke a delegation on-chain (no claim goes through it afterwards)."""
    revoke_signed_item(
        account,
        delegation_file,
        digest,
        primary="Delegation",
        signer_field="provider",
        revoke_method="revoke_delegation",
        to_tuple=delegation_tuple,
        yes=yes,
    )


@cli.command("sign-erc7710", cls=ConnectedProviderCommand)
@account_option()
@click.option("--max", "cap", type=USDC, required=True, help="The claim's cap, the relayer's fee included.")
@click.option("--relayer", type=ADDRESS, required=True, help="The relayer that redeems (the delegate).")
@click.option("--relayer-fee", type=UsdcAmount(allow_zero=True), default="0", show_default=True)
@click.option("--valid-for", "duration", type=Duration(), default="1h", show_default=True)
@click.option("--payee", type=ADDRESS, default=None, help="Receiver of the claim (default: the provider).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None)
def sign_erc7710(
    account: Any,
    cap: int,
    relayer: str,
    relayer_fee: int,
    duration: int,
    payee: str | None,
    output: Path | None,
) -> None:
    """Sign ERC-7710 Delegations to the relayer (no transaction): one `escrow.claim(<= --max, payee)`
    before the expiry, and its fee in USDC; plus the EIP-7702 authorization if the account is not
    a smart account yet. Prints the body of POST /v1/provider/claims/erc7710."""
    if relayer_fee >= cap:
        raise click.BadParameter("the relayer fee must be below --max", param_hint="--relayer-fee")
    deployment = load_deployment()
    fw = require_framework(deployment)
    valid_until = head_timestamp() + duration
    common = {"provider": account.address, "delegate": relayer, "usdc": deployment.usdc}
    claim = dlg.claim_delegation(
        fw, **common, escrow=deployment.escrow, payee=payee or account.address, cap=cap,
        valid_until=valid_until, salt=new_salt(),
    )  # fmt: skip
    body: dict[str, Any] = {"claim": sign_framework_delegation(account, deployment, claim), "fee": None}
    if relayer_fee:
        fee = dlg.fee_delegation(
            fw, **common, fee_collector=relayer, fee=relayer_fee, valid_until=valid_until, salt=new_salt()
        )
        body["fee"] = sign_framework_delegation(account, deployment, fee)
    body["authorization"] = eip7702_upgrade(account, deployment)
    echo_json(body, output)


@cli.command("disable-erc7710", cls=ConnectedProviderCommand)
@account_option()
@click.option(
    "--claim-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="What sign-erc7710 printed.",
)
@click.option(
    "--relayer",
    type=ADDRESS,
    default=None,
    help="Sign gasless disables for this relayer instead of sending.",
)
@yes_option
def disable_erc7710(account: Any, claim_file: Path, relayer: str | None, yes: bool) -> None:
    """Disable an ERC-7710 claim's delegations, the claim's and its relayer fee's (else the relayer
    could still take the fee), with DelegationManager.disableDelegation: sent from the account, or
    with --relayer signed as one-use grants (the body of POST /v1/provider/claims/{id}/disable)."""
    from ape import Contract
    from quotra_dev import framework

    deployment = load_deployment()
    fw = require_framework(deployment)
    try:
        body = json.loads(claim_file.read_text(encoding="utf-8"))
        targets = [
            dlg.Delegation.from_message(body[name]["message"]) for name in ("claim", "fee") if body.get(name)
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise click.BadParameter(f"cannot read {claim_file}: {exc}", param_hint="--claim-file") from None
    if targets[0].delegator != account.address:
        raise click.BadParameter(f"the delegation is {targets[0].delegator}'s", param_hint="--claim-file")
    if relayer is not None:
        grants = [
            dlg.disable_delegation(fw, delegator=account.address, delegate=relayer, target=t, salt=new_salt())
            for t in targets
        ]
        echo_json({"grants": [sign_framework_delegation(account, deployment, g) for g in grants]}, None)
        return
    confirm(yes, "Disable " + " and ".join(f"delegation 0x{t.hash.hex()}" for t in targets) + "?")
    manager = Contract(fw.delegation_manager, abi=framework.abi("DelegationManager"))
    for target in targets:
        with reverts_as_click_errors("disableDelegation"):
            manager.disableDelegation(target.as_tuple(), sender=account)
        click.echo(f"disabled 0x{target.hash.hex()}")
