"""Prepaid on the local Base Sepolia twin, with the relay's real chain wiring (EscrowClient,
DirectRelayer, the settlement worker): a wallet holding USDC and no ETH deposits gaslessly, signs a
permission, calls with an API key; the relay's own worker settles the call on the real escrow;
an on-chain revocation stops its calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from eth_account import Account
from quotra.app import create_app
from quotra.chain import eip712
from quotra.chain.deployment import Deployment
from quotra_dev import twin
from quotra_dev.chain import (
    Chain,
    account_from_key,
    permission_tuple,
    read_usdc_domain,
    sign_authorization,
)
from relay_helpers import listing_body, sign_in

USDC = 10**6


class OnChain:
    def __init__(self, running: twin.Twin, directory: Path) -> None:
        self.twin = running
        self.chain = Chain(running.rpc_url)
        dev = [account_from_key(a.private_key) for a in running.accounts]
        self.owner, self.operator, self.outsider = dev[0], dev[1], dev[2]
        self.usdc = self.chain.contract("MockUSDC", running.usdc)
        self.escrow = self.chain.deploy("QuotraEscrow", self.owner, running.usdc, 3_600, 86_400)
        self.chain.transact(self.escrow.functions.set_operator(self.operator.address, True), self.owner)
        self.usdc_domain = read_usdc_domain(self.usdc, self.chain.chain_id)
        self.deployment_file = directory / "base-sepolia-twin.json"
        Deployment(
            network="base:sepolia-twin",
            chain_id=self.chain.chain_id,
            escrow=self.escrow.address,
            usdc=running.usdc,
            usdc_name=self.usdc_domain.name,
            usdc_version=self.usdc_domain.version,
            owner=self.owner.address,
            operators=(self.operator.address,),
            block=0,
            tx_hash="0x" + "00" * 32,
            fee_bps=1_000,
            withdrawal_delay=3_600,
            refund_window=86_400,
        ).save(self.deployment_file)


@pytest.fixture(scope="module")
def onchain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OnChain]:
    with twin.start() as running:
        yield OnChain(running, tmp_path_factory.mktemp("deployments"))


@pytest.fixture
async def relay(make_settings: Callable[..., Any], onchain: OnChain) -> AsyncIterator[Any]:
    settings = make_settings(
        chain_rpc_url=onchain.twin.rpc_url,
        deployment_file=onchain.deployment_file,
        operator_key="0x" + bytes(onchain.operator.key).hex(),
        prepaid_refresh_seconds=0,
    )
    app = create_app(settings)  # the real sandbox adapter, the real chain wiring
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=("203.0.113.5", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            yield app, client


def deposit_body(
    wallet: Any, onchain: OnChain, amount: int, domain: eip712.Domain | None = None
) -> dict[str, Any]:
    auth = sign_authorization(
        wallet,
        domain or onchain.usdc_domain,
        onchain.escrow.address,
        amount,
        primary="ReceiveWithAuthorization",
        valid_before=int(time.time()) + 3_600,
    )
    return {
        "authorization": {
            "from": auth.payer,
            "to": auth.to,
            "value": str(auth.amount),
            "validAfter": auth.valid_after,
            "validBefore": auth.valid_before,
            "nonce": "0x" + auth.nonce.hex(),
        },
        "signature": auth.signature.hex,
    }


async def test_gasless_deposit__permission__paid_call__settles_on_the_escrow(
    relay: Any, onchain: OnChain
) -> None:
    _, client = relay
    w3 = onchain.chain.w3
    consumer = Account.create()
    onchain.twin.mint_usdc(consumer.address, 10 * USDC)
    headers = {"Authorization": f"Bearer {await sign_in(client, consumer)}"}

    # A wrong USDC domain (mainnet's name) is refused before anything is sent.
    block = w3.eth.block_number
    wrong = eip712.Domain("USD Coin", "2", onchain.chain.chain_id, onchain.twin.usdc)
    reply = await client.post(
        "/v1/account/deposits", json=deposit_body(consumer, onchain, USDC, wrong), headers=headers
    )
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "invalid_signature")
    assert w3.eth.block_number == block

    # The gasless deposit: the relay's relayer submits deposit_with_authorization.
    body = deposit_body(consumer, onchain, 4 * USDC)
    reply = await client.post("/v1/account/deposits", json=body, headers=headers)
    assert reply.status_code == 200, reply.text
    result = reply.json()
    assert result["status"] == "confirmed" and result["amount_atomic"] == 4 * USDC
    assert result["account"]["deposit_atomic"] == 4 * USDC
    assert onchain.escrow.functions.deposits(consumer.address).call() == 4 * USDC
    assert onchain.usdc.functions.balanceOf(consumer.address).call() == 6 * USDC
    assert w3.eth.get_balance(consumer.address) == 0  # never held any ETH
    receipt = w3.eth.get_transaction_receipt(result["tx_hash"])
    assert receipt["from"] == onchain.operator.address
    again = await client.post("/v1/account/deposits", json=body, headers=headers)
    assert (again.status_code, again.json()["error"]["code"]) == (400, "nonce_already_used")

    # One SpendPermission, checked against the chain, and a paid call with an API key.
    typed = (
        await client.get(
            "/v1/account/permission/typed-data", params={"allowance": "2", "days": 3}, headers=headers
        )
    ).json()
    signature = (
        "0x" + bytes(Account.sign_typed_data(consumer.key, full_message=typed["typed_data"]).signature).hex()
    )
    message = typed["typed_data"]["message"]
    assert (
        onchain.escrow.functions.hash_permission(permission_tuple(message)).call().hex()
        == typed["digest"][2:]
    )
    reply = await client.post(
        "/v1/account/permission", json={"permission": message, "signature": signature}, headers=headers
    )
    assert reply.status_code == 200, reply.text
    key = (await client.post("/v1/account/keys", json={"name": "sdk"}, headers=headers)).json()

    provider = Account.create()
    provider_headers = {"Authorization": f"Bearer {await sign_in(client, provider)}"}
    listing = await client.post(
        "/v1/listings", json=listing_body(price_per_call="0.01"), headers=provider_headers
    )
    assert listing.status_code == 201, listing.text
    sdk = openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=key["key"], max_retries=0, http_client=client
    )
    raw = await sdk.chat.completions.with_raw_response.create(
        model="sandbox-model",
        messages=[{"role": "user", "content": "hi"}],  # type: ignore[list-item]
    )
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-quotra-payment"] == "prepaid"
    completion_call_id = raw.headers["quotra-call-id"]

    # The relay's settlement worker settles the call on the escrow (a charges batch).
    call_id = completion_call_id
    status: dict[str, Any] = {}
    for _ in range(300):
        reply = await client.get(f"/v1/calls/{call_id}", headers={"Authorization": f"Bearer {key['key']}"})
        assert reply.status_code == 200, reply.text
        status = reply.json()
        if status["state"] == "settled":
            break
        await asyncio.sleep(0.1)
    price = USDC // 100
    assert (status["state"], status["gate"], status["amount_atomic"], status["charged"]) == (
        "settled",
        "prepaid",
        price,
        True,
    )
    receipt = w3.eth.get_transaction_receipt(status["transaction"])
    assert receipt["status"] == 1 and receipt["from"] == onchain.operator.address
    charges = onchain.escrow.events.ChargesSettled().process_receipt(receipt)
    (event,) = charges
    assert (event.args["amount"], event.args["fee"]) == (price, status["fee_atomic"])
    assert status["fee_atomic"] == price * onchain.escrow.functions.fee_bps().call() // 10_000
    assert onchain.escrow.functions.deposits(consumer.address).call() == 4 * USDC - price
    assert onchain.escrow.functions.earnings(provider.address).call() == price - status["fee_atomic"]
    account = (await client.get("/v1/account", headers=headers)).json()  # refreshed from the chain
    assert account["deposit_atomic"] == 4 * USDC - price
    assert account["permission"]["spent_atomic"] == price
    assert (account["unsettled_atomic"], account["reserved_atomic"], account["settled_total_atomic"]) == (
        0,
        0,
        price,
    )
    digest = account["permission"]["digest"]

    # The consumer revokes the permission gaslessly (signed, submitted by anyone): calls stop.
    revocation = eip712.sign(
        consumer.key,
        eip712.escrow_domain(onchain.chain.chain_id, onchain.escrow.address),
        "Revocation",
        {"account": consumer.address, "item": bytes.fromhex(digest[2:])},
    )
    onchain.chain.transact(
        onchain.escrow.functions.revoke_with_signature(
            consumer.address, bytes.fromhex(digest[2:]), revocation.raw
        ),
        onchain.outsider,
    )
    account = (await client.get("/v1/account", headers=headers)).json()
    assert account["permission"]["revoked"] is True and account["available_atomic"] == 0
    with pytest.raises(openai.APIStatusError) as refused:
        await sdk.chat.completions.create(model="sandbox-model", messages=[{"role": "user", "content": "hi"}])  # type: ignore[list-item]
    assert refused.value.status_code == 402
    # ...and a revoked permission cannot be registered again.
    reply = await client.post(
        "/v1/account/permission", json={"permission": message, "signature": signature}, headers=headers
    )
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "permission_revoked")


async def test_deposit__someone_elses_authorization__refused(relay: Any, onchain: OnChain) -> None:
    _, client = relay
    payer, signed_in = Account.create(), Account.create()
    onchain.twin.mint_usdc(payer.address, USDC)
    headers = {"Authorization": f"Bearer {await sign_in(client, signed_in)}"}
    reply = await client.post(
        "/v1/account/deposits", json=deposit_body(payer, onchain, USDC), headers=headers
    )
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "invalid_deposit")
    broke = Account.create()
    headers = {"Authorization": f"Bearer {await sign_in(client, broke)}"}
    reply = await client.post(
        "/v1/account/deposits", json=deposit_body(broke, onchain, USDC), headers=headers
    )
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "insufficient_usdc")
