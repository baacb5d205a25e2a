"""Contract tests: named actors, MockUSDC and deploy factories, on ape's foundry-launched anvil.

Session-scoped state is deployed once; ape snapshots the chain and reverts it after every test
(see tests/conftest.py for how isolation is limited to this directory). Signing helpers use
eth-account's `encode_typed_data` directly, so they are an independent oracle for the
contracts' and `quotra.chain.eip712`'s hashing.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

USDC = 10**6  # one USDC in atomic units
WITHDRAWAL_DELAY = 3_600
REFUND_WINDOW = 86_400
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

EIP712_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
_AUTHORIZATION_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]
# FiatToken's EIP-3009 and EIP-2612 types, field for field.
USDC_TYPES: dict[str, list[dict[str, str]]] = {
    "TransferWithAuthorization": _AUTHORIZATION_FIELDS,
    "ReceiveWithAuthorization": _AUTHORIZATION_FIELDS,
    "CancelAuthorization": [
        {"name": "authorizer", "type": "address"},
        {"name": "nonce", "type": "bytes32"},
    ],
    "Permit": [
        {"name": "owner", "type": "address"},
        {"name": "spender", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "nonce", "type": "uint256"},
        {"name": "deadline", "type": "uint256"},
    ],
}


class Signature(NamedTuple):
    v: int
    r: bytes
    s: bytes

    def high_s(self) -> Signature:
        """The malleable twin (n - s, flipped v): recovers the same signer, must be refused."""
        s = SECP256K1_N - int.from_bytes(self.s, "big")
        return Signature(55 - self.v, self.r, s.to_bytes(32, "big"))


def address_of(account: Any) -> str:
    return str(getattr(account, "address", account))


def sign_typed(private_key: Any, domain: dict[str, Any], primary: str, message: dict[str, Any]) -> Signature:
    """Signs `message` of USDC type `primary` under `domain` with eth-account."""
    typed = {
        "types": {"EIP712Domain": EIP712_DOMAIN_TYPE, primary: USDC_TYPES[primary]},
        "primaryType": primary,
        "domain": domain,
        "message": message,
    }
    signed = Account.sign_message(encode_typed_data(full_message=typed), private_key)
    return Signature(signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big"))


# ---------------------------------------------------------------- actors


@pytest.fixture(scope="session")
def owner(accounts):
    return accounts[0]


@pytest.fixture(scope="session")
def operator(accounts):
    return accounts[1]


@pytest.fixture(scope="session")
def provider(accounts):
    return accounts[2]


@pytest.fixture(scope="session")
def provider2(accounts):
    return accounts[3]


@pytest.fixture(scope="session")
def consumer(accounts):
    return accounts[4]


@pytest.fixture(scope="session")
def consumer2(accounts):
    return accounts[5]


@pytest.fixture(scope="session")
def relayer(accounts):
    return accounts[6]


@pytest.fixture(scope="session")
def stranger(accounts):
    return accounts[7]


# ---------------------------------------------------------------- USDC


@pytest.fixture(scope="session")
def usdc(project, owner):
    """MockUSDC deployed by `owner` (its owner and only minter)."""
    return owner.deploy(project.MockUSDC)


@pytest.fixture(scope="session")
def mint(usdc, owner) -> Callable[[Any, int], Any]:
    """Mints USDC (atomic units) to an account or address."""

    def _mint(to: Any, amount: int) -> Any:
        return usdc.mint(address_of(to), amount, sender=owner)

    return _mint


@pytest.fixture(scope="session")
def usdc_domain(usdc) -> dict[str, Any]:
    """USDC's EIP-712 domain as the token reports it (never hard-coded per chain)."""
    _, name, version, chain_id, verifying_contract, *_ = usdc.eip712Domain()
    return {
        "name": name,
        "version": version,
        "chainId": chain_id,
        "verifyingContract": str(verifying_contract),
    }


@pytest.fixture(scope="session")
def sign_usdc_typed(usdc_domain) -> Callable[..., Signature]:
    """`sign_usdc_typed(signer, primary, message, domain=None)`: any USDC type (Permit,
    CancelAuthorization, ...) signed with the signer's key under USDC's domain."""

    def _sign(signer: Any, primary: str, message: dict[str, Any], domain: dict[str, Any] | None = None):
        return sign_typed(signer.private_key, domain or usdc_domain, primary, message)

    return _sign


@pytest.fixture(scope="session")
def sign_authorization(chain, usdc_domain) -> Callable[..., tuple[dict[str, Any], Signature]]:
    """An EIP-3009 authorization signed by `payer` (or `signer`): (message, signature).

    `kind` is "TransferWithAuthorization" or "ReceiveWithAuthorization".
    """

    def _sign(
        payer: Any,
        to: Any,
        amount: int,
        *,
        kind: str = "TransferWithAuthorization",
        valid_after: int = 0,
        valid_before: int | None = None,
        nonce: bytes | None = None,
        signer: Any = None,
        domain: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], Signature]:
        message = {
            "from": address_of(payer),
            "to": address_of(to),
            "value": amount,
            "validAfter": valid_after,
            "validBefore": chain.pending_timestamp + 3_600 if valid_before is None else valid_before,
            "nonce": secrets.token_bytes(32) if nonce is None else nonce,
        }
        key = (signer or payer).private_key
        return message, sign_typed(key, domain or usdc_domain, kind, message)

    return _sign


# ---------------------------------------------------------------- escrow


@pytest.fixture(scope="session")
def deploy_escrow(project, owner, usdc) -> Callable[..., Any]:
    """Deploys a QuotraEscrow: `deploy_escrow(withdrawal_delay=..., refund_window=..., token=...)`.

    The session `escrow` fixture (tests/contracts/unit/conftest.py) is one call of it; tests
    that need other constructor arguments call it themselves.
    """

    def _deploy(
        withdrawal_delay: int = WITHDRAWAL_DELAY,
        refund_window: int = REFUND_WINDOW,
        *,
        token: Any = None,
        sender: Any = None,
    ) -> Any:
        return (sender or owner).deploy(project.QuotraEscrow, token or usdc, withdrawal_delay, refund_window)

    return _deploy
