"""Constants, struct mirrors and small helpers shared by the escrow's unit tests."""

from __future__ import annotations

from typing import Any, NamedTuple

from quotra.chain import merkle
from quotra.chain.charges import pack_charge

WITHDRAWAL_DELAY = 3_600
REFUND_WINDOW = 86_400
FEE_BPS = 1_000
MAX_BPS = 10_000
MAX_FEE_BPS = 2_000
USDC = 10**6
# Minted to each consumer (and to every no-ETH wallet a test creates) before anything.
STARTING_BALANCE = 1_000 * USDC
ZERO_ADDRESS = "0x" + "00" * 20
ZERO_BYTES32 = b"\x00" * 32
SOMEONE = "0x" + "11" * 20  # an address that is no actor
ERC1271_MAGIC = bytes.fromhex("1626ba7e")


class Wallet(NamedTuple):
    """An EOA that holds USDC but no ETH: it only signs, a relayer submits."""

    address: str
    private_key: str


# Mirrors of the escrow's structs, in field order, so ape ABI-encodes them as tuples.
class Payment(NamedTuple):
    payer: str
    provider: str
    amount: int
    charged: int  # what the call cost: at most `amount`, the rest goes to the payer's deposit
    valid_after: int
    valid_before: int
    nonce: bytes
    v: int
    r: bytes
    s: bytes


class Credit(NamedTuple):
    """An x402 payment as the escrow credits it: a leaf of a settlement's Merkle root."""

    payer: str
    nonce: bytes
    provider: str
    amount: int
    fee_bps: int


class Settled(NamedTuple):
    """A settled payment with what a refund must present: its credit, root and proof."""

    payment: Payment
    credit: Credit
    root: bytes
    proof: list[bytes]


class SpendPermission(NamedTuple):
    consumer: str
    spender: str
    allowance: int
    valid_after: int
    valid_until: int
    salt: int
    developer: str = ZERO_ADDRESS  # an app developer the charges may pay a markup…
    max_markup_bps: int = 0  # …of at most this rate on top of the calls' base cost


class Delegation(NamedTuple):
    provider: str
    delegate: str
    payee: str
    max_amount: int
    relayer_fee: int
    valid_until: int
    salt: int


def credit_of(payment: Payment, fee_bps: int = FEE_BPS) -> Credit:
    return Credit(payment.payer, payment.nonce, payment.provider, payment.charged, fee_bps)


def leaf(credit: Credit) -> bytes:
    return merkle.Credit(*credit).leaf


def settlement(payments: list[Payment], fee_bps: int = FEE_BPS) -> list[Settled]:
    """The root and proofs of a batch whose payments were all credited, built by the relay's
    own `quotra.chain.merkle`."""
    credits = [credit_of(p, fee_bps) for p in payments]
    leaves = [leaf(c) for c in credits]
    root = merkle.root(leaves)
    return [
        Settled(p, c, root, merkle.proof(leaves, i))
        for i, (p, c) in enumerate(zip(payments, credits, strict=True))
    ]


def charge(provider: Any, amount: int) -> int:
    """One packed prepaid charge, `provider << 96 | amount`, packed by the relay's own code."""
    return pack_charge(address_of(provider), amount)


def raw_charge(provider: Any, amount: int) -> int:
    """A packed charge the relay's packer would refuse (zero provider, zero amount)."""
    return int(address_of(provider), 16) << 96 | amount


def markup_of(base: int, markup_bps: int) -> int:
    """A developer's markup on `base`, rounded down as the relay charges it."""
    return base * markup_bps // MAX_BPS


def split(amount: int, fee_bps: int = FEE_BPS) -> tuple[int, int]:
    """(provider share, platform fee) of a payment, as the design fixes them."""
    fee = amount * fee_bps // MAX_BPS
    return amount - fee, fee


def events(tx: Any, event: Any) -> list[Any]:
    """The logs of one escrow event type in a receipt."""
    return list(tx.decode_logs(event))


def address_of(who: Any) -> str:
    return who if isinstance(who, str) else str(who.address)


SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def high_s(v: int, s: bytes) -> tuple[int, bytes]:
    """The malleable twin of a low-s signature: (v', n - s), which recovers the same signer."""
    return 55 - v, (SECP256K1_N - int.from_bytes(s, "big")).to_bytes(32, "big")


def high_s_raw(signature: bytes) -> bytes:
    """`high_s` of a 65-byte r ‖ s ‖ v signature."""
    v, s = high_s(signature[64], signature[32:64])
    return signature[:32] + s + bytes([v])
