"""Local faucet: `ape run faucet ADDRESS [--amount 100] [--eth 1] --network base:sepolia-twin`.

Mints MockUSDC (as its minter, impersonated through anvil) and optionally sets an ETH balance.
Refuses anywhere but an anvil chain whose USDC is this project's MockUSDC: on a real network
there is no faucet, and nothing here may look like one.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

import click
from ape.cli import ConnectedProviderCommand

from scripts._common import ADDRESS, UsdcAmount, is_anvil, load_deployment, rpc, usdc_contract, usdc_text


def _eth_to_wei(value: str) -> int:
    try:
        eth = Decimal(value)
    except InvalidOperation:
        raise click.BadParameter(f"not an ETH amount: {value!r}", param_hint="--eth") from None
    wei = eth * 10**18
    if not eth.is_finite() or eth < 0 or wei != wei.to_integral_value():
        raise click.BadParameter(f"not an ETH amount: {value!r}", param_hint="--eth")
    return int(wei)


def refusal(usdc: str) -> str | None:
    """Why the faucet must not run on the connected chain, or None if it may."""
    from ape import networks, project

    if not is_anvil():
        return "the faucet only runs on a local anvil chain (the twin or ethereum:local)"
    code = bytes(networks.provider.get_code(usdc))
    mock = bytes.fromhex(project.MockUSDC.contract_type.runtime_bytecode.bytecode.removeprefix("0x"))
    # The installed runtime code is MockUSDC's followed by its immutables (name, version, ...).
    if not (mock and code.startswith(mock)):
        return f"the USDC at {usdc} is not this project's MockUSDC"
    return None


@click.command(cls=ConnectedProviderCommand)
@click.argument("address", type=ADDRESS)
@click.option(
    "--amount", type=UsdcAmount(allow_zero=True), default="100", show_default=True, help="USDC to mint."
)
@click.option("--eth", default=None, help="Also set the ETH balance to this many ETH (e.g. 1).")
def cli(address: str, amount: int, eth: str | None) -> None:
    """Give ADDRESS test USDC (and ETH) on the local twin."""
    wei = _eth_to_wei(eth) if eth is not None else None
    deployment = load_deployment()
    if reason := refusal(deployment.usdc):
        raise click.UsageError(f"refusing: {reason}")
    usdc = usdc_contract(deployment.usdc)
    if amount:
        minter = usdc.owner()
        if not usdc.is_minter(minter):
            raise click.ClickException(f"MockUSDC's owner {minter} is not a minter")
        from ape import networks

        w3 = networks.provider.web3
        rpc("anvil_impersonateAccount", minter)
        try:
            data = usdc.mint.encode_input(address, amount)
            tx_hash = w3.eth.send_transaction({"from": minter, "to": usdc.address, "data": data})
            if w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)["status"] != 1:
                raise click.ClickException(f"mint reverted: {tx_hash.to_0x_hex()}")
        finally:
            rpc("anvil_stopImpersonatingAccount", minter)
    if wei is not None:
        rpc("anvil_setBalance", address, hex(wei))
    balance = usdc.balanceOf(address)
    click.echo(f"{address}: +{usdc_text(amount)} -> {usdc_text(balance)}" + (f", {eth} ETH" if eth else ""))
