"""`DirectRelayer` on the twin: nonces, refusal before sending, EIP-1559 fees, receipts, and the
replacement of a stuck transaction (anvil with automine off)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from quotra.chain.client import EscrowClient
from quotra.chain.relayer import ChainCall, DirectRelayer, RelayerError, TxState, wait_final
from quotra_dev.chain import account_from_key
from relayer_fixtures import ChainEnv
from web3.exceptions import TransactionNotFound


@pytest.fixture
async def escrow(chain_env: ChainEnv) -> AsyncIterator[EscrowClient]:
    d = chain_env.deployment
    client = EscrowClient.connect(chain_env.twin.rpc_url, escrow=d.escrow, usdc=d.usdc, chain_id=d.chain_id)
    yield client
    await client.w3.provider.disconnect()


@pytest.fixture
def sender(chain_env: ChainEnv) -> LocalAccount:
    return account_from_key(chain_env.twin.accounts[4].private_key)


def revoke(escrow: EscrowClient) -> ChainCall:
    """A harmless call anyone may make: revoke a random item of the sender's."""
    return escrow._call(escrow.escrow.functions.revoke(secrets.token_bytes(32)), "revoke")


async def test_concurrent_sends__consecutive_nonces__all_confirmed(
    escrow: EscrowClient, sender: LocalAccount
):
    relayer = DirectRelayer(escrow.w3, sender, chain_id=84532)
    start = await escrow.w3.eth.get_transaction_count(sender.address, "pending")
    subs = await asyncio.gather(*(relayer.send(revoke(escrow), memo=f"n{i}") for i in range(4)))
    assert all(s.state is TxState.SUBMITTED and s.tx_hash for s in subs)
    finals = [await wait_final(relayer, s.id, within=20, poll=0.05) for s in subs]
    assert all(f.state is TxState.CONFIRMED and f.gas_used and f.block_number for f in finals)
    nonces = sorted([(await escrow.w3.eth.get_transaction(HexBytes(s.tx_hash)))["nonce"] for s in subs])
    assert nonces == list(range(start, start + 4))
    tx = await escrow.w3.eth.get_transaction(HexBytes(subs[0].tx_hash))
    assert tx["type"] == 2 and tx["maxFeePerGas"] >= tx["maxPriorityFeePerGas"] > 0  # EIP-1559


async def test_call_that_would_revert__rejected_before_sending__nonce_kept(
    escrow: EscrowClient, sender: LocalAccount, chain_env: ChainEnv
):
    relayer = DirectRelayer(escrow.w3, sender, chain_id=84532)
    nonce = await escrow.w3.eth.get_transaction_count(sender.address, "pending")
    refused = await relayer.send(escrow._call(escrow.escrow.functions.claim(0, sender.address), "claim"))
    assert refused.state is TxState.REJECTED and refused.error == "escrow: zero amount"
    assert await relayer.status(refused.id) == refused
    assert await escrow.w3.eth.get_transaction_count(sender.address, "pending") == nonce
    ok = await relayer.send(revoke(escrow))
    assert (await escrow.w3.eth.get_transaction(HexBytes(ok.tx_hash)))["nonce"] == nonce
    await wait_final(relayer, ok.id, within=20, poll=0.05)


async def test_stuck_transaction__replaced_with_higher_fees__replacement_mined_once(
    escrow: EscrowClient, sender: LocalAccount, chain_env: ChainEnv
):
    relayer = DirectRelayer(escrow.w3, sender, chain_id=84532, replace_after=0.0)
    chain_env.twin.rpc("evm_setAutomine", False)
    try:
        sub = await relayer.send(revoke(escrow), memo="stuck")
        original = sub.tx_hash
        assert original is not None
        old_tx = await escrow.w3.eth.get_transaction(HexBytes(original))  # in the pool, unmined
        pending = await relayer.status(sub.id)  # no receipt, older than replace_after: replaced
        assert pending.state is TxState.SUBMITTED and pending.tx_hash != original
        new_tx = await escrow.w3.eth.get_transaction(HexBytes(pending.tx_hash))
        assert new_tx["nonce"] == old_tx["nonce"]
        assert new_tx["maxPriorityFeePerGas"] > old_tx["maxPriorityFeePerGas"]
        assert new_tx["maxFeePerGas"] > old_tx["maxFeePerGas"]
        with pytest.raises(TransactionNotFound):  # the node dropped the original for the replacement
            await escrow.w3.eth.get_transaction(HexBytes(original))
        chain_env.twin.rpc("evm_mine")
    finally:
        chain_env.twin.rpc("evm_setAutomine", True)
    final = await wait_final(relayer, sub.id, within=20, poll=0.05)
    assert final.state is TxState.CONFIRMED and final.tx_hash == pending.tx_hash
    with pytest.raises(TransactionNotFound):
        await escrow.w3.eth.get_transaction_receipt(HexBytes(original))


async def test_status_of_an_unknown_submission__relayer_error(escrow: EscrowClient, sender: LocalAccount):
    with pytest.raises(RelayerError):
        await DirectRelayer(escrow.w3, sender, chain_id=84532).status("nope")
