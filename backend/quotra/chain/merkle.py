"""The Merkle tree of an x402 settlement, exactly as the escrow builds it.

`settle_authorizations` commits the payments it credited as leaves `hash_credit(payer, nonce,
provider, amount, fee_bps)`, `amount` being what the call was charged (not the authorized value:
its unused rest went to the payer's deposit), hashed pairwise level by level with each pair sorted (snekmate's
`_hash_pair`), an odd last node carried up unchanged. A refund proves its payment with the
sibling hashes from its leaf to the root; `proof` gives them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eth_abi import encode as abi_encode
from eth_hash.auto import keccak  # eth_utils.keccak without its argument checks: hashed per leaf and pair


@dataclass(frozen=True)
class Credit:
    """An x402 payment as the escrow credited it (the contract's `Credit` struct)."""

    payer: str
    nonce: bytes
    provider: str
    amount: int  # charged and split: what a refund returns
    fee_bps: int

    def as_tuple(self) -> tuple[str, bytes, str, int, int]:
        return (self.payer, self.nonce, self.provider, self.amount, self.fee_bps)

    @property
    def leaf(self) -> bytes:
        return keccak(
            abi_encode(
                ["address", "bytes32", "address", "uint256", "uint256"],
                [self.payer, self.nonce, self.provider, self.amount, self.fee_bps],
            )
        )


def hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    if not leaves:
        raise ValueError("a settlement root needs at least one leaf")
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        nodes = levels[-1]
        parents = [
            hash_pair(nodes[i], nodes[i + 1]) if i + 1 < len(nodes) else nodes[i]
            for i in range(0, len(nodes), 2)
        ]
        levels.append(parents)
    return levels


def root(leaves: Sequence[bytes]) -> bytes:
    return _levels(leaves)[-1][0]


def proofs(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Each leaf's sibling hashes up to the root (none where a node was carried up), from one
    building of the tree: n leaves cost n - 1 hashes, not n² as one `proof` per leaf would."""
    levels = _levels(leaves)[:-1]
    paths = []
    for index in range(len(leaves)):
        path = []
        for nodes in levels:
            sibling = index ^ 1
            if sibling < len(nodes):
                path.append(nodes[sibling])
            index //= 2
        paths.append(path)
    return paths


def proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The sibling hashes from `leaves[index]` up to the root."""
    return proofs(leaves)[index]


def verify(path: Sequence[bytes], root_: bytes, leaf: bytes) -> bool:
    node = leaf
    for sibling in path:
        node = hash_pair(node, sibling)
    return node == root_
