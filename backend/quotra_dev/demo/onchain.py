"""The on-chain half of the demo: every payment path of the escrow, on a fresh local twin.

Starts the Base Sepolia twin, deploys the escrow with `ape run deploy escrow` (the same command an
operator runs against Base Sepolia), then: a consumer without ETH deposits gaslessly, an x402
call is paid per call, a spend permission settles a batch of calls to two providers, and a
provider without ETH claims through a relayer. Ends by checking solvency and the 90/10 split to
the atomic unit. Takes a few seconds; anvil is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from quotra.chain import eip712
from quotra.chain.charges import aggregate
from quotra.chain.deployment import DEPLOYMENTS_DIR_ENV, Deployment, deployment_path
from quotra.money import format_usdc, parse_usdc
from rich.console import Console
from rich.table import Table
from web3.contract import Contract
from web3.types import TxReceipt

from quotra_dev import twin
from quotra_dev.chain import (
    ZERO_ADDRESS,
    Chain,
    account_from_key,
    delegation_tuple,
    new_account,
    permission_tuple,
    sign_authorization,
)

NETWORK: Final = "base:sepolia-twin:node"
DEPLOYER_ALIAS: Final = "TEST::0"  # ape's test account 0 = anvil's dev account 0 (public test key)
MAX_BPS: Final = 10_000


class DemoError(RuntimeError):
    """A step of the demo failed (the message says which and why)."""


@dataclass
class Ledger:
    """What the story paid, to check the escrow's books against at the end."""

    paid_to: dict[str, int] = field(default_factory=dict)  # provider -> gross amount of its calls
    tx_hashes: list[tuple[str, str]] = field(default_factory=list)
    gas_per_call: list[tuple[str, int, int]] = field(default_factory=list)  # (path, gas, calls)

    def paid(self, provider: str, amount: int) -> None:
        self.paid_to[provider] = self.paid_to.get(provider, 0) + amount

    def tx(self, label: str, receipt: TxReceipt) -> TxReceipt:
        self.tx_hashes.append((label, receipt["transactionHash"].to_0x_hex()))
        return receipt


def project_root() -> Path:
    """The checkout holding ape-config.yaml (ape runs its scripts from there)."""
    for root in (Path.cwd(), twin.REPO_ROOT):
        if (root / "ape-config.yaml").is_file() and (root / "scripts" / "deploy.py").is_file():
            return root
    raise DemoError("run the demo from the Quotra checkout (no ape-config.yaml and scripts/ found)")


def deploy_with_ape(chain_: twin.Twin, operator: str) -> Deployment:
    """`ape run deploy escrow` against the twin; returns the deployment file it wrote."""
    root = project_root()
    ape = shutil.which("ape", path=str(Path(sys.executable).parent)) or shutil.which("ape")
    if ape is None:
        raise DemoError("the ape CLI is not installed (make setup)")
    directory = Path(os.environ.get(DEPLOYMENTS_DIR_ENV) or root / "deployments")
    env = {**os.environ, **chain_.ape_env(), DEPLOYMENTS_DIR_ENV: str(directory), "PYTHONWARNINGS": "ignore"}
    env.setdefault("APE_DATA_FOLDER", str(root / ".cache" / "ape"))
    command = [
        ape, "run", "deploy", "escrow",
        "--network", NETWORK,
        "--account", DEPLOYER_ALIAS,
        "--operator", operator,
        "--withdrawal-delay", "1h",
        "--yes",
    ]  # fmt: skip
    done = subprocess.run(  # noqa: S603 - fixed argv
        command, cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise DemoError(f"`ape run deploy escrow` failed: {lines[-1] if lines else done.returncode}")
    return Deployment.load(deployment_path("base", "sepolia-twin", directory))


class Story:
    def __init__(self, console: Console, chain_: twin.Twin, deployment: Deployment) -> None:
        self.console = console
        self.twin = chain_
        self.deployment = deployment
        self.chain = Chain(chain_.rpc_url)
        self.w3 = self.chain.w3
        self.escrow: Contract = self.chain.contract("QuotraEscrow", deployment.escrow)
        self.usdc: Contract = self.chain.contract("MockUSDC", deployment.usdc)
        dev = [account_from_key(a.private_key) for a in chain_.accounts]
        self.owner, self.operator, self.relayer = dev[0], dev[1], dev[2]
        # Fresh wallets that never hold ETH: they only sign.
        self.alice, self.bob = new_account(), new_account()
        self.p1, self.p2 = new_account(), new_account()
        self.names: dict[str, str] = {
            self.alice.address: "Alice",
            self.bob.address: "Bob",
            self.p1.address: "Provider 1",
            self.p2.address: "Provider 2",
            self.operator.address: "Operator",
            self.relayer.address: "Relayer",
        }
        self.ledger = Ledger()

    # ---- helpers ------------------------------------------------------------------------------

    def step(self, title: str) -> None:
        self.console.rule(f"[bold]{title}")

    def say(self, text: str) -> None:
        self.console.print(f"  {text}")

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def send(self, label: str, fn: Any, sender: LocalAccount) -> TxReceipt:
        receipt = self.ledger.tx(label, self.chain.transact(fn, sender))
        tx_hash = receipt["transactionHash"].to_0x_hex()
        self.say(f"[dim]{label}: tx {tx_hash[:18]}…, gas {receipt['gasUsed']:,}[/]")
        return receipt

    def eth(self, address: str) -> int:
        return int(self.w3.eth.get_balance(to_checksum_address(address)))

    # ---- the story ----------------------------------------------------------------------------

    def run(self) -> None:
        f = self.escrow.functions
        d = self.deployment
        self.say(f"escrow [cyan]{d.escrow}[/] on chain {d.chain_id}, fee {d.fee_bps} bps")
        self.say(f'USDC {d.usdc}, EIP-712 domain "{d.usdc_name}" v{d.usdc_version} (read from the chain)')
        self.twin.mint_usdc(self.alice.address, parse_usdc("20"))
        self.twin.mint_usdc(self.bob.address, parse_usdc("1"))
        self.say("Alice: prepaid API-key consumer. Bob: x402 consumer. Operator: the relay's settling")
        self.say("key. Relayer: submits gasless transactions for a USDC fee.")
        self.say("faucet: Alice gets 20 USDC, Bob 1 USDC; neither has any ETH")

        self.step("1. Alice deposits 10 USDC without ETH (ReceiveWithAuthorization via a relayer)")
        assert self.eth(self.alice.address) == 0
        deposit = sign_authorization(
            self.alice, d.usdc_domain, d.escrow, parse_usdc("10"), primary="ReceiveWithAuthorization"
        )
        self.say(
            "Alice signs an EIP-3009 ReceiveWithAuthorization to the escrow (only the escrow can redeem it)"
        )
        self.send(
            "deposit_with_authorization", f.deposit_with_authorization(*deposit.deposit_args()), self.relayer
        )
        self.say(f"Alice's prepaid balance: {format_usdc(f.deposits(self.alice.address).call())} USDC")

        self.step("2. Bob pays one call per x402 (TransferWithAuthorization), settled by the relay")
        price = parse_usdc("0.25")
        auth = sign_authorization(self.bob, d.usdc_domain, d.escrow, price)
        self.say("Bob's x402 client signs a TransferWithAuthorization of 0.25 USDC to the escrow")
        receipt = self.send(
            "settle_authorizations", f.settle_authorizations([auth.payment(self.p1.address)]), self.operator
        )
        self.ledger.paid(self.p1.address, price)
        self.ledger.gas_per_call.append(
            ("x402 per call (settle_authorizations, a batch of one)", receipt["gasUsed"], 1)
        )

        self.step("3. Alice's API-key calls: one SpendPermission, one batch for two providers")
        now = self.now()
        permission = {
            "consumer": self.alice.address,
            "spender": self.operator.address,
            "allowance": parse_usdc("5"),
            "valid_after": now,
            "valid_until": now + 30 * 86_400,
            "salt": secrets.randbits(52),
            "developer": ZERO_ADDRESS,  # no app: no markup
            "max_markup_bps": 0,
        }
        signature = eip712.sign(self.alice.key, d.escrow_domain, "SpendPermission", permission)
        self.say(
            "Alice signs a SpendPermission once: up to 5 USDC for 30 days, spender = the relay's operator"
        )
        calls = [(self.p1.address, parse_usdc("0.12"))] * 3 + [(self.p2.address, parse_usdc("0.35"))] * 5
        charges = aggregate(calls)
        self.say(
            f"the relay meters {len(calls)} calls, settles them as {len(charges)} charges in one transaction"
        )
        receipt = self.send(
            "settle_charges",
            f.settle_charges(
                permission_tuple(permission), signature.raw, secrets.token_bytes(32), charges, 0
            ),
            self.operator,
        )
        for provider, amount in calls:
            self.ledger.paid(provider, amount)
        self.ledger.gas_per_call.append(
            (f"prepaid batch of {len(calls)} calls (settle_charges)", receipt["gasUsed"], len(calls))
        )

        self.step("4. Provider 2 claims without ETH (a signed Delegation submitted by a relayer)")
        assert self.eth(self.p2.address) == 0
        earned = f.earnings(self.p2.address).call()
        relayer_fee = parse_usdc("0.05")
        delegation = {
            "provider": self.p2.address,
            "delegate": ZERO_ADDRESS,
            "payee": self.p2.address,
            "max_amount": earned,
            "relayer_fee": relayer_fee,
            "valid_until": self.now() + 7 * 86_400,
            "salt": secrets.randbits(52),
        }
        signature = eip712.sign(self.p2.key, d.escrow_domain, "Delegation", delegation)
        self.say(
            f"Provider 2 signs a Delegation for its {format_usdc(earned)} USDC, paying the relayer "
            f"{format_usdc(relayer_fee)} USDC"
        )
        relayer_before = self.usdc.functions.balanceOf(self.relayer.address).call()
        self.send(
            "claim_with_delegation",
            f.claim_with_delegation(delegation_tuple(delegation), signature.raw, earned),
            self.relayer,
        )
        relayer_got = self.usdc.functions.balanceOf(self.relayer.address).call() - relayer_before

        self.report()
        self.check(relayer_got, relayer_fee)

    # ---- results ------------------------------------------------------------------------------

    def report(self) -> None:
        f, usdc = self.escrow.functions, self.usdc.functions
        self.step("Balances")
        table = Table(show_header=True, header_style="bold")
        for column in ("party", "address", "ETH", "wallet USDC", "deposit", "earnings"):
            table.add_column(column, justify="left" if column in ("party", "address") else "right")
        for address, name in self.names.items():
            table.add_row(
                name,
                address[:10] + "…",
                f"{self.eth(address) / 10**18:.4f}",
                format_usdc(usdc.balanceOf(address).call()),
                format_usdc(f.deposits(address).call()),
                format_usdc(f.earnings(address).call()),
            )
        table.add_row(
            "Escrow",
            self.escrow.address[:10] + "…",
            "",
            format_usdc(usdc.balanceOf(self.escrow.address).call()),
            format_usdc(f.total_deposits().call()),
            format_usdc(f.total_earnings().call()),
        )
        self.console.print(table)
        self.say(
            f"platform fees: [bold]{format_usdc(f.platform_fees().call())} USDC[/]   "
            f"liabilities: {format_usdc(f.liabilities().call())} USDC"
        )

        gas = Table(title="Gas per paid call", show_header=True, header_style="bold")
        for column in ("path", "gas / tx", "calls", "gas / call"):
            gas.add_column(column, justify="left" if column == "path" else "right")
        for path, used, calls in self.ledger.gas_per_call:
            gas.add_row(path, f"{used:,}", str(calls), f"{used // calls:,}")
        self.console.print(gas)
        self.say("(first payments to new providers: cold storage; steady state in bench/gas.py)")
        self.console.print("  transactions:")
        for label, tx_hash in self.ledger.tx_hashes:
            self.console.print(f"    {label:<27} {tx_hash}", soft_wrap=True)

    def check(self, relayer_got: int, relayer_fee: int) -> None:
        f, usdc = self.escrow.functions, self.usdc.functions
        self.step("Checks")
        balance, liabilities = usdc.balanceOf(self.escrow.address).call(), f.liabilities().call()
        if balance != liabilities:
            raise DemoError(f"solvency: escrow holds {balance} but owes {liabilities}")
        self.say(f"[green]ok[/] usdc.balanceOf(escrow) == liabilities() == {format_usdc(balance)} USDC")
        bps = self.deployment.fee_bps
        for provider, paid in self.ledger.paid_to.items():
            credited = f.earnings(provider).call() + usdc.balanceOf(provider).call()
            if provider == self.p2.address:
                credited += relayer_got  # the relayer's fee came out of Provider 2's earnings
            expected = paid * (MAX_BPS - bps) // MAX_BPS
            if credited != expected or paid * (MAX_BPS - bps) % MAX_BPS:
                raise DemoError(f"split: {self.names[provider]} was credited {credited}, expected {expected}")
            self.say(
                f"[green]ok[/] {self.names[provider]}: paid {format_usdc(paid)} for its calls, "
                f"earned exactly {format_usdc(credited)} ({(MAX_BPS - bps) // 100}%)"
            )
        if relayer_got != relayer_fee:
            raise DemoError(f"relayer received {relayer_got}, expected {relayer_fee}")
        self.say(f"[green]ok[/] the gas relayer received its fee of {format_usdc(relayer_fee)} USDC")
        for wallet in (self.alice, self.bob, self.p1, self.p2):
            if self.eth(wallet.address):
                raise DemoError(f"{self.names[wallet.address]} was given ETH")
        self.say("[green]ok[/] consumers and providers never held ETH")


def run(console: Console) -> None:
    """Tell the on-chain story; raises on any failed step. The twin is always stopped."""
    started = time.monotonic()
    console.rule("[bold magenta]Quotra on a local Base Sepolia twin")
    with console.status("starting anvil (chain id 84532, MockUSDC at the Base Sepolia USDC address)…"):
        chain_ = twin.start()
    with chain_:
        console.print(f"  twin running at {chain_.rpc_url}")
        operator = chain_.accounts[1].address
        with console.status(f"ape run deploy escrow --network {NETWORK} --account {DEPLOYER_ALIAS} …"):
            deployment = deploy_with_ape(chain_, operator)
        console.print(f"  deployed by `ape run deploy escrow` in block {deployment.block}")
        Story(console, chain_, deployment).run()
    console.rule(f"[bold green]done in {time.monotonic() - started:.1f} s; the local chain is stopped")
