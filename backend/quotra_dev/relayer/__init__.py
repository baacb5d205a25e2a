"""The local gas relayer for the twin (`quotra relayer`): a 1Shot-style JSON-RPC service that submits
escrow calls and ERC-7710 redemptions (MetaMask's Delegation Framework) to anvil with its own gas
key, charges a USDC fee (a claim's `relayer_fee`, a signed withdrawal's fee, a USDC transfer in a
redemption) and posts Ed25519-signed webhooks, its keys served as a JWKS. Shapes: see
`quotra.chain.oneshot`."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Final, Literal

from eth_account import Account
from quotra.chain.deployment import BASE_SEPOLIA_USDC, Deployment
from quotra.money import parse_usdc
from quotra.webhooks import Ed25519Signer

from quotra_dev.relayer.app import create_relayer_app
from quotra_dev.relayer.service import DEFAULT_SPONSORED, RelayerConfig, RelayerCore, RpcError

KEY_ENV: Final = "QUOTRA_RELAYER_KEY"
ED25519_ENV: Final = "QUOTRA_RELAYER_ED25519_KEY"

__all__ = [
    "DEFAULT_SPONSORED",
    "ED25519_ENV",
    "KEY_ENV",
    "RelayerConfig",
    "RelayerCore",
    "RpcError",
    "config_from_env",
    "create_relayer_app",
]


def config_from_env(
    *,
    rpc_url: str,
    chain_id: int,
    deployment: Path | None = None,
    escrow: str | None = None,
    usdc: str | None = None,
    fee: str | Decimal = "0.01",
    webhook_format: Literal["oneshot", "standard"] = "oneshot",
    sponsored: frozenset[str] = DEFAULT_SPONSORED,
) -> RelayerConfig:
    """The relayer's configuration: the gas key from `$QUOTRA_RELAYER_KEY` (required), the
    Ed25519 webhook key from `$QUOTRA_RELAYER_ED25519_KEY` (generated when unset), the escrow
    and USDC from a deployment record or given explicitly."""
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise ValueError(f"set {KEY_ENV} to the relayer's gas key (a dev account key on the twin)")
    account = Account.from_key(key)
    ed25519 = os.environ.get(ED25519_ENV, "").strip()
    signer = Ed25519Signer.from_text(ed25519) if ed25519 else Ed25519Signer.generate()
    targets: list[str] = []
    framework = None
    if deployment is not None:
        record = Deployment.load(deployment)
        if record.chain_id != chain_id:
            raise ValueError(f"{deployment} is for chain {record.chain_id}, not {chain_id}")
        targets.append(record.escrow)
        usdc = usdc or record.usdc
        framework = record.delegation_framework
    if escrow:
        targets.append(escrow)
    if not targets:
        raise ValueError("give the escrow to relay for (--deployment or --escrow)")
    return RelayerConfig(
        rpc_url=rpc_url,
        gas_account=account,
        chain_id=chain_id,
        usdc=usdc or BASE_SEPOLIA_USDC,
        targets=tuple(targets),
        signer=signer,
        min_fee=parse_usdc(fee),
        webhook_format=webhook_format,
        sponsored=sponsored,
        framework=framework,
    )
