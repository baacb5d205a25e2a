"""A thin synchronous web3 layer over the escrow and USDC for the demo, the gas bench and tests.

The relay has its own async client; this one favours plainness: local keys sign, every
transaction waits for its receipt and a revert raises `TxFailed` with the contract's reason.
Amounts are atomic USDC units (6 decimals); `quotra.money` converts them at the edges.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from quotra.chain import eip712
from quotra.chain.delegation import SetCodeAuthorization, describe_revert
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.exceptions import ContractLogicError, Web3RPCError
from web3.types import TxReceipt

ZERO_ADDRESS: Final = "0x0000000000000000000000000000000000000000"
BUILD_FILE: Final = Path(".build") / "__local__.json"
# The checkout this package is installed from (editable install), for running outside it.
REPO_ROOT: Final = Path(__file__).resolve().parents[2]


class EscrowError(RuntimeError):
    """Base of this module's errors."""


class TxFailed(EscrowError):
    """A transaction reverted (the message carries the revert reason when there is one)."""


class ArtifactMissing(EscrowError):
    """Compiled contracts are missing: run `ape compile` (`make compile`)."""


# ---- amounts ---------------------------------------------------------------------------------


# ---- compiled artifacts ----------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str
    runtime_bytecode: str


@cache
def _build(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactMissing(f"{path} not found: run `ape compile` (make compile)") from None
    return data


def default_build_file() -> Path:
    """ape's build output in the current directory, else in the checkout of this package."""
    here = Path.cwd() / BUILD_FILE
    return here if here.is_file() else REPO_ROOT / BUILD_FILE


def load_artifact(name: str, build_file: Path | None = None) -> Artifact:
    """A contract compiled by ape (`.build/__local__.json`)."""
    build_file = build_file or default_build_file()
    contract_types = _build(build_file.resolve()).get("contractTypes", {})
    if name not in contract_types:
        raise ArtifactMissing(f"{name} is not in {build_file}: run `ape compile` (make compile)")
    ct = contract_types[name]
    return Artifact(
        name=name,
        abi=ct["abi"],
        bytecode=ct["deploymentBytecode"]["bytecode"],
        runtime_bytecode=ct["runtimeBytecode"]["bytecode"],
    )


# ---- transactions ----------------------------------------------------------------------------


def _reason(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return str(message).removeprefix("execution reverted: ")


class Chain:
    """A web3 connection plus local signing keys; sends a transaction and waits for its receipt."""

    def __init__(self, rpc_url: str, timeout: float = 30.0) -> None:
        self.w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))
        self.chain_id = self.w3.eth.chain_id

    def contract(self, name: str, address: str, build_file: Path | None = None) -> Contract:
        return self.w3.eth.contract(
            address=to_checksum_address(address), abi=load_artifact(name, build_file).abi
        )

    def transact(self, fn: ContractFunction, sender: LocalAccount, gas: int | None = None) -> TxReceipt:
        """Sign `fn` with `sender`'s key, send it and wait. Reverts raise `TxFailed` before sending."""
        params: dict[str, Any] = {
            "from": sender.address,
            "nonce": self.w3.eth.get_transaction_count(sender.address, "pending"),
            "chainId": self.chain_id,
        }
        try:
            params["gas"] = gas or int(fn.estimate_gas(params) * 1.2) + 10_000  # type: ignore[arg-type]
        except (ContractLogicError, Web3RPCError) as exc:
            raise TxFailed(f"{fn.fn_name}: {revert_text(exc)}") from exc
        tx = fn.build_transaction(params)  # type: ignore[arg-type]
        return self._send(tx, sender, fn.fn_name)

    def send(
        self,
        to: str,
        data: bytes,
        sender: LocalAccount,
        *,
        authorizations: Sequence[SetCodeAuthorization] = (),
        label: str = "call",
    ) -> TxReceipt:
        """Sign and send a raw call (type 4 when it carries EIP-7702 authorizations) and wait.
        A call that would revert raises `TxFailed` with the reason before anything is sent."""
        tx: dict[str, Any] = {
            "from": sender.address,
            "to": to_checksum_address(to),
            "data": data,
            "value": 0,
            "nonce": self.w3.eth.get_transaction_count(sender.address, "pending"),
            "chainId": self.chain_id,
        }
        if authorizations:
            tx["authorizationList"] = [a.as_tx() for a in authorizations]
        try:
            tx["gas"] = int(self.w3.eth.estimate_gas(tx) * 1.2) + 10_000  # type: ignore[arg-type]
        except (ContractLogicError, Web3RPCError) as exc:
            raise TxFailed(f"{label}: {revert_text(exc)}") from exc
        block = self.w3.eth.get_block("latest")
        tip = 1_000_000
        tx.update(maxPriorityFeePerGas=tip, maxFeePerGas=2 * int(block.get("baseFeePerGas") or 0) + tip)
        if authorizations:
            tx["type"] = 4
        return self._send(tx, sender, label)

    def upgrade(self, account: LocalAccount, implementation: str, sponsor: LocalAccount) -> TxReceipt:
        """Makes `account` an EIP-7702 smart account delegating to `implementation`; `sponsor`
        sends (and pays for) the type-4 transaction, so `account` needs no ETH."""
        nonce = int(self.w3.eth.get_transaction_count(account.address, "pending"))
        if sponsor.address == account.address:
            nonce += 1  # a self-sent authorization is checked after the sender's nonce is used
        auth = sign_set_code(account, implementation, self.chain_id, nonce)
        return self.send(account.address, b"", sponsor, authorizations=[auth], label="EIP-7702 upgrade")

    def deploy(self, name: str, sender: LocalAccount, *args: Any, build_file: Path | None = None) -> Contract:
        artifact = load_artifact(name, build_file)
        factory = self.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        tx = factory.constructor(*args).build_transaction(
            {
                "from": sender.address,
                "nonce": self.w3.eth.get_transaction_count(sender.address, "pending"),
                "chainId": self.chain_id,
            }
        )
        receipt = self._send(tx, sender, f"deploy {name}")
        address = receipt["contractAddress"]
        assert address is not None
        return self.w3.eth.contract(address=address, abi=artifact.abi)

    def _send(self, tx: Any, sender: LocalAccount, label: str) -> TxReceipt:
        signed = sender.sign_transaction(tx)
        tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30, poll_latency=0.02)
        if receipt["status"] != 1:
            raise TxFailed(f"{label}: reverted in transaction {tx_hash.to_0x_hex()}")
        return receipt


def revert_text(exc: Exception) -> str:
    """A revert as text: the framework's custom error by name, else the revert string."""
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x"):
        return describe_revert(data)
    return _reason(exc)


def sign_set_code(
    account: LocalAccount, implementation: str, chain_id: int, nonce: int
) -> SetCodeAuthorization:
    """`account`'s signed EIP-7702 authorization to delegate its code to `implementation`."""
    signed = Account.sign_authorization(
        {"chainId": chain_id, "address": to_checksum_address(implementation), "nonce": nonce}, account.key
    )
    return SetCodeAuthorization(chain_id, implementation, nonce, signed.y_parity, signed.r, signed.s)


def new_account() -> LocalAccount:
    """A fresh random key (the demo's consumer and providers, who never hold ETH)."""
    account: LocalAccount = Account.create()
    return account


def account_from_key(key: str | bytes) -> LocalAccount:
    account: LocalAccount = Account.from_key(key)
    return account


# ---- EIP-712 messages as the contracts take them ---------------------------------------------


def read_usdc_domain(usdc: Contract, chain_id: int) -> eip712.Domain:
    """USDC's EIP-712 domain as the token itself reports it (`"USDC"` on Base Sepolia, `"USD Coin"`
    on mainnet): never assumed per network."""
    return eip712.Domain(
        usdc.functions.name().call(), usdc.functions.version().call(), chain_id, usdc.address
    )


def random_nonce() -> bytes:
    return secrets.token_bytes(32)


@dataclass(frozen=True)
class Authorization:
    """A signed EIP-3009 authorization (`TransferWithAuthorization` / `ReceiveWithAuthorization`)."""

    payer: str
    to: str
    amount: int
    valid_after: int
    valid_before: int
    nonce: bytes
    signature: eip712.Signature

    def payment(self, provider: str, charged: int | None = None) -> tuple[Any, ...]:
        """The escrow's `Payment` struct for this authorization served by `provider`, charging
        `charged` of it (all of it unless given; the rest goes to the payer's deposit)."""
        sig = self.signature
        return (
            self.payer,
            provider,
            self.amount,
            self.amount if charged is None else charged,
            self.valid_after,
            self.valid_before,
            self.nonce,
            sig.v,
            sig.r,
            sig.s,
        )

    def deposit_args(self) -> tuple[Any, ...]:
        """The arguments of `deposit_with_authorization`."""
        sig = self.signature
        return (self.payer, self.amount, self.valid_after, self.valid_before, self.nonce, sig.v, sig.r, sig.s)


def sign_authorization(
    payer: LocalAccount,
    usdc_domain: eip712.Domain,
    to: str,
    amount: int,
    *,
    primary: str = "TransferWithAuthorization",
    valid_after: int = 0,
    valid_before: int = 2**48,
    nonce: bytes | None = None,
) -> Authorization:
    """Sign what an x402 client (Transfer...) or a gasless depositor (Receive...) signs."""
    nonce = nonce or random_nonce()
    message = {
        "from": payer.address,
        "to": to,
        "value": amount,
        "validAfter": valid_after,
        "validBefore": valid_before,
        "nonce": nonce,
    }
    signature = eip712.sign(payer.key, usdc_domain, primary, message)
    return Authorization(payer.address, to, amount, valid_after, valid_before, nonce, signature)


def permission_tuple(message: dict[str, Any]) -> tuple[Any, ...]:
    """The escrow's `SpendPermission` struct from its EIP-712 message."""
    return tuple(message[name] for name, _ in eip712.TYPES["SpendPermission"])


def delegation_tuple(message: dict[str, Any]) -> tuple[Any, ...]:
    """The escrow's `Delegation` struct from its EIP-712 message."""
    return tuple(message[name] for name, _ in eip712.TYPES["Delegation"])
