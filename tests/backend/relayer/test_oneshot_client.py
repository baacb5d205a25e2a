"""The 1Shot-style client (`OneShotRelayer`) against the local relayer service, over real HTTP,
submitting to the twin; and the `quotra relayer` command itself."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from eth_account import Account
from quotra.chain import eip712
from quotra.chain.client import EscrowClient
from quotra.chain.oneshot import OneShotError, OneShotRelayer, UnknownTask, new_task_id
from quotra.chain.relayer import ChainCall, TxState, wait_final
from quotra.cli import main as cli_main
from quotra.webhooks import Ed25519Signer, JwksCache, WebhookVerifier, canonical_json
from quotra_dev import twin as twin_module
from quotra_dev.chain import new_account
from quotra_dev.relayer import RelayerCore
from relayer_fixtures import MIN_FEE, ChainEnv, LocalRelayer, Sink, relayer_config
from web3 import AsyncHTTPProvider, AsyncWeb3

USDC = 10**6


@pytest.fixture
async def client(local_relayer: LocalRelayer, sink: tuple[Sink, str]):
    relayer = OneShotRelayer(local_relayer.url, chain_id=84532, destination_url=sink[1], timeout=10)
    yield relayer
    await relayer.aclose()


@pytest.fixture
async def escrow(chain_env: ChainEnv) -> AsyncIterator[EscrowClient]:
    d = chain_env.deployment
    client = EscrowClient.connect(chain_env.twin.rpc_url, escrow=d.escrow, usdc=d.usdc, chain_id=d.chain_id)
    yield client
    await client.w3.provider.disconnect()


async def test_capabilities_and_fee_data(client: OneShotRelayer, chain_env: ChainEnv):
    caps = await client.capabilities()
    assert caps.target_address == caps.fee_collector == chain_env.gas.address
    assert caps.tokens == (
        {"address": chain_env.deployment.usdc, "symbol": "USDC", "name": "USDC", "decimals": 6},
    )
    fee = await client.fee_data()
    assert (fee.token, fee.decimals, fee.min_fee) == (chain_env.deployment.usdc, 6, MIN_FEE)
    assert 29 <= fee.expiry - time.time() <= 31  # the quote lives ~30 s
    assert fee.gas_price > 0 and fee.rate > 0 and fee.context
    assert fee.target_address == chain_env.gas.address


async def test_send_claim__confirmed__signed_webhooks_and_status(
    client: OneShotRelayer, local_relayer: LocalRelayer, chain_env: ChainEnv, escrow: EscrowClient, sink
):
    receiver, _ = sink
    provider, payee = new_account(), new_account()
    earned = chain_env.fund_provider(provider.address, 3 * USDC)
    delegation, signature = chain_env.delegation(
        provider, earned, delegate=chain_env.gas.address, payee=payee.address
    )
    fee_before = chain_env.balance(chain_env.gas.address)
    call = escrow.encode_claim_with_delegation(delegation, bytes.fromhex(signature[2:]), earned)

    sub = await client.send(call, memo="réclamation №1")
    assert sub.state is TxState.PENDING and sub.id.startswith("0x") and len(sub.id) == 66
    final = await wait_final(client, sub.id, within=20, poll=0.05)
    assert final.state is TxState.CONFIRMED and final.tx_hash and final.block_number
    assert final.memo == "réclamation №1"
    assert chain_env.balance(payee.address) == earned - MIN_FEE
    assert chain_env.balance(chain_env.gas.address) - fee_before == MIN_FEE
    assert chain_env.twin.web3().eth.get_balance(provider.address) == 0

    raw = await client.status_raw(sub.id, logs=True)
    assert set(raw) == {"id", "chainId", "createdAt", "status", "memo", "hash", "receipt"}
    assert raw["receipt"]["transactionHash"] == final.tx_hash and raw["receipt"]["logs"]

    # Webhooks: submitted (4) then confirmed (0), each verifiable against the relayer's JWKS.
    local_relayer.idle()
    mine = [json.loads(body) for _, body in receiver.received if sub.id.encode() in body]
    assert sorted((w["type"], w["data"]["status"]) for w in mine) == [(0, 200), (4, 110)]
    async with httpx.AsyncClient() as http:
        verifier = WebhookVerifier(JwksCache(http, local_relayer.jwks_url))
        for headers, body in receiver.received:
            if sub.id.encode() in body:
                event = await verifier.verify(headers, body)
                assert event.memo == "réclamation №1" and event.task_id == sub.id
    assert "réclamation".encode() in receiver.received[-1][1]  # UTF-8 on the wire, not \u-escaped


async def test_send__fee_below_the_quote__rejected_and_nothing_submitted(
    client: OneShotRelayer, local_relayer: LocalRelayer, chain_env: ChainEnv, escrow: EscrowClient
):
    provider = new_account()
    earned = chain_env.fund_provider(provider.address, USDC)
    delegation, signature = chain_env.delegation(provider, earned, relayer_fee=MIN_FEE - 1)
    tasks = len(local_relayer.core.tasks)
    sub = await client.send(
        escrow.encode_claim_with_delegation(delegation, bytes.fromhex(signature[2:]), earned)
    )
    assert sub.state is TxState.REJECTED and sub.error and sub.error.startswith("4200 Insufficient Payment")
    assert len(local_relayer.core.tasks) == tasks
    assert chain_env.earnings(provider.address) == earned


async def test_send__would_revert__rejected_by_simulation(
    client: OneShotRelayer, local_relayer: LocalRelayer, chain_env: ChainEnv, escrow: EscrowClient
):
    provider = new_account()
    earned = chain_env.fund_provider(provider.address, USDC)
    delegation, signature = chain_env.delegation(provider, earned + 1)
    call = escrow.encode_claim_with_delegation(delegation, bytes.fromhex(signature[2:]), earned + 1)
    tasks = len(local_relayer.core.tasks)
    sub = await client.send(call)
    assert sub.state is TxState.REJECTED
    assert sub.error == "4211 Simulation Failed: escrow: amount exceeds earnings"
    assert len(local_relayer.core.tasks) == tasks


async def test_send__a_delegation_for_another_delegate__refused(
    client: OneShotRelayer, chain_env: ChainEnv, escrow: EscrowClient
):
    provider = new_account()
    earned = chain_env.fund_provider(provider.address, USDC)
    delegation, signature = chain_env.delegation(provider, earned, delegate=chain_env.operator.address)
    sub = await client.send(
        escrow.encode_claim_with_delegation(delegation, bytes.fromhex(signature[2:]), earned)
    )
    assert sub.state is TxState.REJECTED and sub.error and sub.error.startswith("4209")


async def test_send__sponsored_revocation__confirmed(client: OneShotRelayer, chain_env: ChainEnv, escrow):
    account, item = new_account(), secrets.token_bytes(32)
    signature = eip712.sign(
        account.key,
        chain_env.deployment.escrow_domain,
        "Revocation",
        {"account": account.address, "item": item},
    )
    sub = await client.send(escrow.encode_revoke_with_signature(account.address, item, signature.raw))
    assert (await wait_final(client, sub.id, within=20, poll=0.05)).state is TxState.CONFIRMED
    assert await escrow.is_revoked(account.address, item)


async def test_send__unrelayed_target_or_call__4209(client: OneShotRelayer, chain_env: ChainEnv, escrow):
    call = ChainCall(chain_env.deployment.usdc, bytes.fromhex("a9059cbb" + "00" * 64))
    with pytest.raises(OneShotError) as refused:
        await client.call(
            "relayer_send7710Transaction", client.send_params(call, memo=None, task_id=None, context=None)
        )
    assert refused.value.code == 4209
    # An escrow call that pays no fee and is not sponsored (anyone may call `revoke`, but not for free).
    unpaid = escrow._call(escrow.escrow.functions.revoke(secrets.token_bytes(32)), "revoke")
    sub = await client.send(unpaid)
    assert sub.state is TxState.REJECTED and "revoke is not relayed" in (sub.error or "")


async def test_send__same_task_id_twice__one_task_never_two(
    client: OneShotRelayer, local_relayer: LocalRelayer, chain_env: ChainEnv, escrow: EscrowClient
):
    provider = new_account()
    earned = chain_env.fund_provider(provider.address, USDC)
    delegation, signature = chain_env.delegation(provider, earned // 2)
    call = escrow.encode_claim_with_delegation(delegation, bytes.fromhex(signature[2:]), earned // 2)
    task_id = new_task_id()
    first = await client.send(call, memo="dup", task_id=task_id)
    again = await client.send(call, memo="dup", task_id=task_id)  # e.g. after a timeout
    assert first.id == again.id == task_id and again.state is not TxState.REJECTED
    assert await wait_final(client, task_id, within=20, poll=0.05)
    local_relayer.idle()
    assert [t for t in local_relayer.core.tasks.values() if t.memo == "dup"] == [
        local_relayer.core.tasks[task_id]
    ]
    assert chain_env.earnings(provider.address) == earned - earned // 2  # claimed once


async def test_status__unknown_task(client: OneShotRelayer):
    with pytest.raises(UnknownTask) as unknown:
        await client.status(new_task_id())
    assert unknown.value.code == 4208


async def test_send__expired_quote__4204(
    client: OneShotRelayer, local_relayer: LocalRelayer, chain_env, escrow
):
    quote = await client.fee_data()
    call = escrow._call(
        escrow.escrow.functions.revoke_with_signature(chain_env.gas.address, b"\0" * 32, b""), "r"
    )
    params = client.send_params(call, memo=None, task_id=None, context=quote.context)
    core: RelayerCore = local_relayer.core
    core.clock = lambda: time.time() + 31
    try:
        with pytest.raises(OneShotError) as expired:
            await client.call("relayer_send7710Transaction", params)
    finally:
        core.clock = time.time
    assert expired.value.code == 4204
    forged = params | {"context": quote.context[:-4] + "AAAA"}
    with pytest.raises(OneShotError) as invalid:
        await client.call("relayer_send7710Transaction", forged)
    assert invalid.value.code == -32602


async def test_memo_and_destination_limits(client: OneShotRelayer, local_relayer: LocalRelayer):
    call = ChainCall("0x" + "11" * 20, b"\x12\x34\x56\x78")
    with pytest.raises(ValueError, match="memo"):
        client.send_params(call, memo="m" * 257, task_id=None, context=None)
    with pytest.raises(ValueError, match="destinationUrl"):
        OneShotRelayer(local_relayer.url, chain_id=84532, destination_url="https://x/" + "a" * 250)
    params = client.send_params(call, memo=None, task_id=None, context=None)
    for bad in ({"memo": "m" * 257}, {"destinationUrl": "ftp://x"}, {"taskId": "0x12"}):
        with pytest.raises(OneShotError) as refused:
            await client.call("relayer_send7710Transaction", params | bad)
        assert refused.value.code in (-32602, 4213)
    with pytest.raises(OneShotError) as wrong_chain:
        await client.call("relayer_getFeeData", {"chainId": "8453", "token": "0x" + "00" * 20})
    assert wrong_chain.value.code == 4206
    with pytest.raises(OneShotError) as unknown:
        await client.call("relayer_nope", [])
    assert unknown.value.code == -32601


async def test_webhook_delivery__retried_with_backoff_until_2xx(
    client: OneShotRelayer, local_relayer: LocalRelayer, chain_env: ChainEnv, escrow: EscrowClient, sink
):
    receiver, _ = sink
    receiver.failures, receiver.only = 2, b'"type":4'  # the "submitted" event fails twice
    account, item = new_account(), secrets.token_bytes(32)
    message = {"account": account.address, "item": item}
    signature = eip712.sign(account.key, chain_env.deployment.escrow_domain, "Revocation", message)
    sub = await client.send(escrow.encode_revoke_with_signature(account.address, item, signature.raw))
    await wait_final(client, sub.id, within=20, poll=0.05)
    local_relayer.idle()
    deliveries = [d for d in local_relayer.core.deliveries if d.task_id == sub.id]
    assert [(d.attempt, d.status_code) for d in deliveries if d.type == 4] == [(1, 500), (2, 500), (3, 200)]
    assert [(d.attempt, d.status_code) for d in deliveries if d.type == 0] == [(1, 200)]
    # Each attempt is signed afresh (its timestamp stays inside the receiver's window).
    bodies = [
        json.loads(body) for _, body in receiver.received if b'"type":4' in body and sub.id.encode() in body
    ]
    assert len({b["signature"] for b in bodies}) >= 1 and all(b["data"]["id"] == sub.id for b in bodies)


def test_standard_webhooks_format__verifies(chain_env: ChainEnv):
    config = relayer_config(chain_env, webhook_format="standard")
    core = RelayerCore(config, AsyncWeb3(AsyncHTTPProvider("http://127.0.0.1:9")), httpx.AsyncClient())
    body, headers = core.webhook_request("0x" + "ab" * 32, 0, {"id": "0x" + "ab" * 32, "status": 200})
    assert body == canonical_json(json.loads(body))
    assert headers["webhook-id"] == "0x" + "ab" * 32 + ":0" and headers["webhook-signature"].startswith(
        "v1a,"
    )
    verifier = WebhookVerifier(
        JwksCache(None, None, pinned=[(config.signer.kid, config.signer.key.verify_key)])
    )
    event = asyncio.run(verifier.verify(headers, body))
    assert (event.event_id, event.type, event.format) == (headers["webhook-id"], 0, "standard")


def test_quotra_relayer_command(chain_env: ChainEnv, tmp_path: Path):
    port = twin_module.free_port()
    seed = secrets.token_hex(32)
    gas = Account.from_key(chain_env.twin.accounts[5].private_key)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("QUOTRA_")},
        "QUOTRA_RELAYER_KEY": chain_env.twin.accounts[5].private_key,
        "QUOTRA_RELAYER_ED25519_KEY": seed,
        "QUOTRA_CHAIN_RPC_URL": chain_env.twin.rpc_url,
    }
    quotra = str(Path(sys.executable).parent / "quotra")
    args = [quotra, "relayer", "--port", str(port), "--deployment", str(chain_env.deployment_file)]
    keyless = {"QUOTRA_RELAYER_KEY": "", "QUOTRA_CHAIN_RPC_URL": chain_env.twin.rpc_url}
    refused = CliRunner().invoke(cli_main, args[1:], env=keyless)
    assert refused.exit_code != 0 and "QUOTRA_RELAYER_KEY" in refused.output
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                jwks = httpx.get(url + "/.well-known/jwks.json", timeout=1).json()
                break
            except httpx.HTTPError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.1)
        signer = Ed25519Signer.from_text(seed)
        assert jwks == {"keys": [signer.jwk()]}
        assert signer.jwk()["kid"] == signer.kid and set(signer.jwk()) >= {"kty", "crv", "kid", "x"}
        reply = httpx.post(
            url + "/relayers",
            json={"jsonrpc": "2.0", "id": 7, "method": "relayer_getCapabilities", "params": ["84532"]},
        ).json()
        assert reply["id"] == 7 and reply["result"]["84532"]["targetAddress"] == gas.address
        assert httpx.post(url + "/", content=b"{oops").json()["error"]["code"] == -32700
    finally:
        process.terminate()
        process.wait(10)
