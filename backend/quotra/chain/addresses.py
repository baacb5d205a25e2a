"""EIP-55 checksummed addresses, remembered: one costs a keccak and ~20 µs of Python, and the paid
call's path, the settlement worker and the indexer checksum the same payers and providers over and
over (each x402 call's recovered signer, each credit of each settled batch)."""

from __future__ import annotations

from functools import lru_cache

from eth_utils import to_checksum_address


@lru_cache(maxsize=1 << 16)
def checksum(address: str | bytes) -> str:
    """`eth_utils.to_checksum_address`, cached (raises as it does for what is not an address)."""
    return to_checksum_address(address)
