"""MetaMask's Delegation Framework on a local chain, from the pinned npm packages.

`@metamask/delegation-abis` ships the framework's creation bytecode and ABIs (v1.3.0, MetaMask's
audited contracts, never recompiled here) and `@metamask/delegation-deployments` the addresses
MetaMask deployed them to, the same on every chain. `install` places the contracts Quotra uses at
Base Sepolia's addresses exactly as the twin places MockUSDC at the USDC address: each constructor
is simulated and its runtime code and storage are written, nothing is mined. So a wallet or a
relayer sees the framework where it is on Base Sepolia, and a deployment record names the same
contracts on both chains.

The npm packages are read through node (`node_modules`, as the Makefile installs them), with their
own exports, once per process.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from functools import cache
from typing import Any, Final

from eth_abi import encode as abi_encode
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from quotra.chain.delegation import FRAMEWORK_VERSION
from quotra.chain.deployment import BASE_SEPOLIA_CHAIN_ID, DelegationFramework

from quotra_dev.twin import REPO_ROOT, place_contract

# The enforcers Quotra's grants use: claims, their fees and gasless revocations
# (quotra.chain.delegation), and what a MetaMask ERC-7715 `erc20-token-periodic` grant carries.
ENFORCERS: Final = (
    "AllowedCalldataEnforcer",
    "AllowedMethodsEnforcer",
    "AllowedTargetsEnforcer",
    "ERC20BalanceChangeEnforcer",
    "ERC20PeriodTransferEnforcer",
    "ERC20TransferAmountEnforcer",
    "ExactCalldataEnforcer",
    "LimitedCallsEnforcer",
    "NonceEnforcer",
    "RedeemerEnforcer",
    "TimestampEnforcer",
    "ValueLteEnforcer",
)
CONTRACTS: Final = ("DelegationManager", "EIP7702StatelessDeleGatorImpl", *ENFORCERS)
# delegation-deployments' name -> delegation-abis' export, where they differ.
_NPM_NAMES: Final = {"EIP7702StatelessDeleGatorImpl": "EIP7702StatelessDeleGator"}
# The ERC-4337 EntryPoint v0.7 the DeleGator records (only its ERC-4337 paths use it; it is not
# installed: redemptions never touch it).
ENTRY_POINT: Final = "0x0000000071727De22E5E9d8BAf0edAc6f37da032"

_NODE_SCRIPT: Final = """
import * as bytecode from '@metamask/delegation-abis/bytecode';
import * as abis from '@metamask/delegation-abis';
import { DELEGATOR_CONTRACTS } from '@metamask/delegation-deployments';
const [names, version] = JSON.parse(process.argv[1]);
const out = { bytecode: {}, abis: {}, deployments: {} };
for (const name of names) { out.bytecode[name] = bytecode[name]; out.abis[name] = abis[name]; }
for (const [chainId, contracts] of Object.entries(DELEGATOR_CONTRACTS[version] ?? {})) {
  out.deployments[chainId] = contracts;
}
console.log(JSON.stringify(out));
"""


class FrameworkError(RuntimeError):
    """The npm packages are missing, or the framework is not where it should be."""


def npm_name(name: str) -> str:
    return _NPM_NAMES.get(name, name)


@cache
def _npm() -> dict[str, Any]:
    names = sorted({npm_name(n) for n in CONTRACTS})
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            ["node", "--input-type=module", "-e", _NODE_SCRIPT, json.dumps([names, FRAMEWORK_VERSION])],  # noqa: S607
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError as exc:
        raise FrameworkError(f"node is needed to read @metamask/delegation-*: {exc}") from None
    if done.returncode != 0:
        raise FrameworkError(
            "cannot read @metamask/delegation-abis / -deployments (run `make setup`): "
            + done.stderr.strip()[-500:]
        )
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def creation_code(name: str) -> str:
    """A contract's creation bytecode as published in `@metamask/delegation-abis` (0x-hex)."""
    code = _npm()["bytecode"].get(npm_name(name))
    if not code:
        raise FrameworkError(f"@metamask/delegation-abis has no bytecode for {name}")
    return str(code)


def abi(name: str) -> list[dict[str, Any]]:
    """A contract's ABI as published in `@metamask/delegation-abis`."""
    entries: list[dict[str, Any]] = _npm()["abis"][npm_name(name)]
    return entries


def deployed(chain_id: int) -> DelegationFramework | None:
    """Where MetaMask deployed the framework on `chain_id` (`@metamask/delegation-deployments`),
    restricted to the contracts Quotra uses; None for a chain it lists nothing for."""
    contracts = _npm()["deployments"].get(str(chain_id))
    if not contracts:
        return None
    return DelegationFramework(version=FRAMEWORK_VERSION, contracts={n: contracts[n] for n in CONTRACTS})


def twin_framework() -> DelegationFramework:
    """The framework as `install` places it on a local chain: at Base Sepolia's addresses."""
    framework = deployed(BASE_SEPOLIA_CHAIN_ID)
    if framework is None:  # pragma: no cover - the pinned package lists Base Sepolia
        raise FrameworkError("@metamask/delegation-deployments lists no Base Sepolia deployment")
    return framework


def install(rpc: Callable[..., Any], owner: str) -> DelegationFramework:
    """Places the framework's contracts Quotra uses on a local anvil at Base Sepolia's addresses
    (those already there are left alone); `owner` owns the DelegationManager (it may pause it).
    `rpc(method, *params)` is a raw JSON-RPC call that returns the result."""
    framework = twin_framework()
    args: dict[str, bytes] = {
        "DelegationManager": abi_encode(["address"], [to_checksum_address(owner)]),
        "EIP7702StatelessDeleGatorImpl": abi_encode(
            ["address", "address"], [framework.delegation_manager, ENTRY_POINT]
        ),
    }
    for name in CONTRACTS:
        address = framework.address(name)
        if HexBytes(rpc("eth_getCode", address, "latest") or b""):
            continue
        place_contract(rpc, address, creation_code(name) + args.get(name, b"").hex(), owner)
    return framework
