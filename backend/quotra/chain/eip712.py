"""EIP-712 types of the escrow and of USDC's EIP-3009, in one place.

The relay, the ape scripts and the tests all sign and hash through this module, and
the contract's ``hash_*`` views are tested against it, so the two cannot drift.
Hashing is done once per type (type hashes, domain separators are cached) and with
coincurve for signing and recovery: this sits on the paid-call hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

from coincurve import PrivateKey, PublicKey
from eth_abi import encode as abi_encode
from eth_utils import keccak, to_checksum_address

from quotra.chain.addresses import checksum

# secp256k1 group order; signatures with s above half of it are refused (as USDC does).
SECP256K1_N: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N: Final = SECP256K1_N // 2

ESCROW_DOMAIN_NAME: Final = "Quotra Escrow"
ESCROW_DOMAIN_VERSION: Final = "1"

# Type name -> ordered (name, solidity type) fields. Spelled exactly as in the contracts.
TYPES: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "SpendPermission": (
        ("consumer", "address"),
        ("spender", "address"),
        ("allowance", "uint256"),
        ("valid_after", "uint256"),
        ("valid_until", "uint256"),
        ("salt", "uint256"),
        ("developer", "address"),
        ("max_markup_bps", "uint256"),
    ),
    "Delegation": (
        ("provider", "address"),
        ("delegate", "address"),
        ("payee", "address"),
        ("max_amount", "uint256"),
        ("relayer_fee", "uint256"),
        ("valid_until", "uint256"),
        ("salt", "uint256"),
    ),
    "Revocation": (("account", "address"), ("item", "bytes32")),
    # A consumer's signed withdrawal steps, which a relayer submits (ETH-free exits): one shape,
    # `amount` being the amount to request, the relayer's fee out of the withdrawal, or the
    # pending amount to cancel.
    "RequestWithdrawal": (
        ("consumer", "address"),
        ("amount", "uint256"),
        ("nonce", "uint256"),
        ("deadline", "uint256"),
    ),
    "Withdraw": (
        ("consumer", "address"),
        ("relayer_fee", "uint256"),
        ("nonce", "uint256"),
        ("deadline", "uint256"),
    ),
    "CancelWithdrawal": (
        ("consumer", "address"),
        ("amount", "uint256"),
        ("nonce", "uint256"),
        ("deadline", "uint256"),
    ),
    "TransferWithAuthorization": (
        ("from", "address"),
        ("to", "address"),
        ("value", "uint256"),
        ("validAfter", "uint256"),
        ("validBefore", "uint256"),
        ("nonce", "bytes32"),
    ),
    "ReceiveWithAuthorization": (
        ("from", "address"),
        ("to", "address"),
        ("value", "uint256"),
        ("validAfter", "uint256"),
        ("validBefore", "uint256"),
        ("nonce", "bytes32"),
    ),
    "CancelAuthorization": (("authorizer", "address"), ("nonce", "bytes32")),
}

EIP712_DOMAIN_FIELDS: Final = (
    ("name", "string"),
    ("version", "string"),
    ("chainId", "uint256"),
    ("verifyingContract", "address"),
)


def encode_type(primary: str) -> str:
    """`Name(type field,...)` as EIP-712 spells it (these types reference no others)."""
    fields = ",".join(f"{typ} {name}" for name, typ in TYPES[primary])
    return f"{primary}({fields})"


TYPE_HASHES: Final[dict[str, bytes]] = {name: keccak(text=encode_type(name)) for name in TYPES}
_DOMAIN_TYPE_HASH: Final = keccak(
    text="EIP712Domain(" + ",".join(f"{t} {n}" for n, t in EIP712_DOMAIN_FIELDS) + ")"
)
_ABI_TYPES: Final[dict[str, list[str]]] = {
    name: ["bytes32", *(typ for _, typ in fields)] for name, fields in TYPES.items()
}


class InvalidSignature(ValueError):
    """A signature that is malformed, high-s, or does not recover."""


@dataclass(frozen=True)
class Domain:
    """An EIP-712 domain: read USDC's name and version from the chain, never assume them."""

    name: str
    version: str
    chain_id: int
    verifying_contract: str

    @cached_property
    def separator(self) -> bytes:
        return keccak(
            abi_encode(
                ["bytes32", "bytes32", "bytes32", "uint256", "address"],
                [
                    _DOMAIN_TYPE_HASH,
                    keccak(text=self.name),
                    keccak(text=self.version),
                    self.chain_id,
                    self.verifying_contract,
                ],
            )
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "chainId": self.chain_id,
            "verifyingContract": to_checksum_address(self.verifying_contract),
        }


def escrow_domain(chain_id: int, escrow: str) -> Domain:
    return Domain(ESCROW_DOMAIN_NAME, ESCROW_DOMAIN_VERSION, chain_id, escrow)


def _value(message: dict[str, Any], name: str, typ: str) -> Any:
    value = message[name]
    if typ == "bytes32" and isinstance(value, str):
        raw = bytes.fromhex(value.removeprefix("0x"))
        if len(raw) != 32:
            raise ValueError(f"{name} must be 32 bytes")
        return raw
    return value


def struct_hash(primary: str, message: dict[str, Any]) -> bytes:
    """`hashStruct(message)` for one of `TYPES`."""
    values = [TYPE_HASHES[primary], *(_value(message, n, t) for n, t in TYPES[primary])]
    return keccak(abi_encode(_ABI_TYPES[primary], values))


def digest(domain: Domain, primary: str, message: dict[str, Any]) -> bytes:
    """The 32 bytes a wallet signs: `keccak(0x1901 ‖ domainSeparator ‖ hashStruct)`."""
    return keccak(b"\x19\x01" + domain.separator + struct_hash(primary, message))


def typed_data(domain: Domain, primary: str, message: dict[str, Any]) -> dict[str, Any]:
    """The full EIP-712 JSON a wallet (`eth_signTypedData_v4`) is asked to sign."""
    msg = {
        n: ("0x" + v.hex() if isinstance(v, bytes) else v)
        for n, v in ((n, _value(message, n, t)) for n, t in TYPES[primary])
    }
    return {
        "types": {
            "EIP712Domain": [{"name": n, "type": t} for n, t in EIP712_DOMAIN_FIELDS],
            primary: [{"name": n, "type": t} for n, t in TYPES[primary]],
        },
        "primaryType": primary,
        "domain": domain.as_dict(),
        "message": msg,
    }


@dataclass(frozen=True)
class Signature:
    """A secp256k1 signature as USDC and the escrow take it (v in {27, 28}, low s)."""

    v: int
    r: bytes
    s: bytes
    raw: bytes = field(repr=False)

    @classmethod
    def from_bytes(cls, raw: bytes | str) -> Signature:
        if isinstance(raw, str):
            raw = bytes.fromhex(raw.removeprefix("0x"))
        if len(raw) != 65:
            raise InvalidSignature("signature must be 65 bytes")
        v = raw[64]
        if v in (0, 1):
            v += 27
        if v not in (27, 28):
            raise InvalidSignature("signature v must be 27 or 28")
        if int.from_bytes(raw[32:64], "big") > SECP256K1_HALF_N:
            raise InvalidSignature("signature s is not canonical (high-s)")
        return cls(v, raw[:32], raw[32:64], raw[:64] + bytes([v]))

    @property
    def hex(self) -> str:
        return "0x" + self.raw.hex()


def sign_digest(private_key: bytes | str | PrivateKey, msg_digest: bytes) -> Signature:
    """Sign a 32-byte digest (coincurve produces low-s signatures). A signer that signs often
    keeps a `PrivateKey`: building one from bytes costs twice the signature."""
    if isinstance(private_key, str):
        private_key = bytes.fromhex(private_key.removeprefix("0x"))
    if isinstance(private_key, bytes):
        private_key = PrivateKey(private_key)
    sig = private_key.sign_recoverable(msg_digest, hasher=None)
    return Signature.from_bytes(sig[:64] + bytes([sig[64] + 27]))


def sign(private_key: bytes | str, domain: Domain, primary: str, message: dict[str, Any]) -> Signature:
    return sign_digest(private_key, digest(domain, primary, message))


def recover(msg_digest: bytes, signature: Signature) -> str:
    """The address that signed `msg_digest` (checksummed). Raises `InvalidSignature`."""
    try:
        public = PublicKey.from_signature_and_message(
            signature.r + signature.s + bytes([signature.v - 27]), msg_digest, hasher=None
        )
    except Exception as exc:  # coincurve raises plain Exception/ValueError on bad points
        raise InvalidSignature("signature does not recover") from exc
    return checksum(keccak(public.format(compressed=False)[1:])[-20:])
