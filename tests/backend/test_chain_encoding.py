"""The settlement batch's calldata, encoded and decoded by eth_abi, against web3's contract encoding;
every proof of one tree building against its root."""

from __future__ import annotations

import os

import pytest
from eth_account import Account
from quotra.chain import eip712, merkle
from quotra.chain.client import Calldata, EscrowClient, PaymentArgs, abi
from web3 import AsyncWeb3


def _payment(i: int) -> PaymentArgs:
    payer, provider = Account.create().address, Account.create().address
    low_s = bytes([os.urandom(1)[0] & 0x7F]) + os.urandom(31)  # the escrow takes low s only
    sig = eip712.Signature.from_bytes(os.urandom(32) + low_s + bytes([27 + i % 2]))
    return PaymentArgs(payer, provider, 1_000 + i, 500 + i, 0, 2**40 + i, os.urandom(32), sig)


@pytest.fixture
def client() -> EscrowClient:
    w3 = AsyncWeb3()
    escrow, usdc = Account.create().address, Account.create().address
    return EscrowClient(w3, escrow=escrow, usdc=usdc, chain_id=84532)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_settle_calldata_is_web3s_and_reads_back(client: EscrowClient, n: int) -> None:
    payments = [_payment(i) for i in range(n)]
    call = client.encode_settle_authorizations(payments)
    reference = client.escrow.functions.settle_authorizations([p.as_tuple() for p in payments])
    assert bytes(call.data) == bytes.fromhex(reference._encode_transaction_data()[2:])
    decoded = client.decode_settle_authorizations(bytes(call.data))
    assert [(f[0].lower(), f[2], f[3], f[6]) for f in decoded] == [
        (p.payer.lower(), p.amount, p.charged, p.nonce) for p in payments
    ]


def test_calldata_refuses_another_functions_input(client: EscrowClient) -> None:
    other = Calldata(abi("QuotraEscrow"), "reconcile_authorization").encode(_payment(0).as_tuple())
    with pytest.raises(ValueError, match="calldata of another function"):
        client.decode_settle_authorizations(other)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 64])
def test_every_leafs_proof_leads_to_the_root(n: int) -> None:
    leaves = [os.urandom(32) for _ in range(n)]
    root = merkle.root(leaves)
    paths = merkle.proofs(leaves)
    assert len(paths) == n
    for i, path in enumerate(paths):
        assert merkle.verify(path, root, leaves[i])
        assert not merkle.verify(path, root, os.urandom(32))


def test_checksummed_addresses_are_eth_utils_and_refuse_what_is_not_an_address() -> None:
    from eth_utils import to_checksum_address
    from quotra.chain.addresses import checksum

    for _ in range(20):
        address = Account.create().address
        raw = bytes.fromhex(address[2:])
        assert checksum(address.lower()) == checksum(raw) == to_checksum_address(raw) == address
        assert checksum(address.lower()) == address  # remembered: the same answer again
    for bad in ("0x1234", "0x" + "zz" * 20, b"\x01" * 19):
        with pytest.raises(ValueError):
            checksum(bad)


def test_the_relay_hashes_with_safe_pysha3() -> None:
    """keccak that keeps the GIL (quotra/__init__.py); the same hashes as pycryptodome's."""
    import subprocess
    import sys

    from eth_hash.backends.pycryptodome import backend as cryptodome

    probe = (
        "import quotra, eth_hash.auto as auto, eth_utils;"
        "print(eth_utils.keccak(b'quotra').hex(), type(auto.keccak._backend.keccak256.__self__).__name__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "ETH_HASH_BACKEND"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    digest, backend = out.stdout.split()
    assert backend == "PySha3Backend"
    assert digest == cryptodome.keccak256(b"quotra").hex()
