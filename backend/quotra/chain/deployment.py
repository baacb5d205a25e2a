"""Where an escrow is deployed on a network: the `deployments/<network>.json` record.

`ape run deploy escrow` writes it; the admin/consumer/provider scripts, the relay and the demo
read it. USDC's EIP-712 name and version are read from the chain at deploy time and kept here,
so nothing downstream hard-codes them per network; so are the addresses of MetaMask's Delegation
Framework on that chain (from `@metamask/delegation-deployments`; on the twin, where its npm
bytecode was installed at those same addresses).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Final

from eth_utils import is_address, to_checksum_address
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from quotra.chain.eip712 import Domain, escrow_domain

BASE_SEPOLIA_CHAIN_ID: Final = 84532
BASE_MAINNET_CHAIN_ID: Final = 8453
BASE_SEPOLIA_USDC: Final = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
BASE_MAINNET_USDC: Final = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
# Circle's USDC per chain id. Local chains (31337, 1337) use the Base Sepolia address, where the
# deploy script installs MockUSDC, so every chain Quotra runs on has USDC at a known address.
KNOWN_USDC: Final[dict[int, str]] = {
    BASE_SEPOLIA_CHAIN_ID: BASE_SEPOLIA_USDC,
    BASE_MAINNET_CHAIN_ID: BASE_MAINNET_USDC,
}
LOCAL_CHAIN_IDS: Final = frozenset({31337, 1337})

DEPLOYMENTS_DIR_ENV: Final = "QUOTRA_DEPLOYMENTS_DIR"


class DeploymentError(RuntimeError):
    """A deployment record is missing, unreadable or for another chain."""


def _checksum(value: str) -> str:
    if not is_address(value):
        raise ValueError(f"not an address: {value!r}")
    return to_checksum_address(value)


Address = Annotated[str, AfterValidator(_checksum)]


class DelegationFramework(BaseModel):
    """MetaMask's Delegation Framework on the deployment's chain: its version and the addresses of
    the contracts Quotra uses, by their `@metamask/delegation-deployments` names."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: str
    contracts: dict[str, Address]

    def address(self, name: str) -> str:
        try:
            return self.contracts[name]
        except KeyError:
            raise DeploymentError(f"the deployment records no {name} of the Delegation Framework") from None

    @property
    def delegation_manager(self) -> str:
        return self.address("DelegationManager")

    @property
    def stateless_delegator(self) -> str:
        """The EIP-7702 implementation an EOA delegates to, to become a MetaMask smart account."""
        return self.address("EIP7702StatelessDeleGatorImpl")


class Deployment(BaseModel):
    """One escrow deployment. Addresses are stored checksummed; amounts in atomic units."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    network: str
    chain_id: int
    escrow: Address
    usdc: Address
    usdc_name: str
    usdc_version: str
    owner: Address
    operators: tuple[Address, ...] = ()
    block: int
    tx_hash: str
    fee_bps: int
    withdrawal_delay: int
    refund_window: int
    deployed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    # None where the framework is not deployed (then ERC-7710 claims and allowances are off).
    delegation_framework: DelegationFramework | None = None

    @property
    def escrow_domain(self) -> Domain:
        """The domain SpendPermission, Delegation and Revocation are signed under."""
        return escrow_domain(self.chain_id, self.escrow)

    @property
    def usdc_domain(self) -> Domain:
        """The domain EIP-3009 authorizations are signed under (as read from the chain)."""
        return Domain(self.usdc_name, self.usdc_version, self.chain_id, self.usdc)

    def with_operator(self, operator: str, enabled: bool) -> Deployment:
        """A copy whose operator list reflects `set_operator(operator, enabled)`."""
        operator = _checksum(operator)
        others = tuple(op for op in self.operators if op != operator)
        return self.model_copy(update={"operators": (*others, operator) if enabled else others})

    @classmethod
    def load(cls, path: Path | str) -> Deployment:
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DeploymentError(f"no deployment file {path}") from exc
        except ValueError as exc:  # pydantic.ValidationError and bad JSON
            raise DeploymentError(f"unreadable deployment file {path}: {exc}") from exc

    def save(self, path: Path | str) -> Path:
        """Write atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def deployments_dir() -> Path:
    """`$QUOTRA_DEPLOYMENTS_DIR`, else `./deployments` (ape runs scripts from the project root)."""
    return Path(os.environ.get(DEPLOYMENTS_DIR_ENV) or "deployments")


def network_slug(ecosystem: str, network: str) -> str:
    """The file stem for a network: `base:sepolia-twin` -> `base-sepolia-twin`."""
    return f"{ecosystem}-{network}".lower().replace(":", "-")


def deployment_path(ecosystem: str, network: str, directory: Path | None = None) -> Path:
    return (directory or deployments_dir()) / f"{network_slug(ecosystem, network)}.json"


def load_for_chain(path: Path | str, chain_id: int) -> Deployment:
    """Load a record and refuse it if it was written for another chain."""
    deployment = Deployment.load(path)
    if deployment.chain_id != chain_id:
        raise DeploymentError(
            f"{path} is for chain {deployment.chain_id}, but the connected chain is {chain_id}"
        )
    return deployment
