"""Quotra: a pay-per-call AI model marketplace (the relay lives in this package)."""

import os

__version__ = "0.1.0"

# keccak through safe-pysha3 (CPython's own Keccak code: ~1.3 µs a 64-byte hash, holding the GIL)
# rather than pycryptodome, which eth-hash would pick first: ~8 µs through cffi, dropping the GIL
# for each hash, so the event loop queued behind the database thread several times per x402 call
# (its EIP-712 digest and recovery, the receipt, each settled batch's Merkle tree). eth-hash reads
# the choice on its first hash; an operator's own ETH_HASH_BACKEND stands.
os.environ.setdefault("ETH_HASH_BACKEND", "pysha3")
