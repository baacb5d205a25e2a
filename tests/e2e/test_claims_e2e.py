"""ETH-free claims end to end on the twin: a provider with zero ETH signs a Delegation; the relay
(uvicorn on a free port) checks it and hands it to the local relayer (uvicorn on another port),
which submits to anvil and reports back with Ed25519-signed webhooks the relay verifies against the
relayer's JWKS. Refused claims never reach the relayer; a relayer that is down or slow delays a
claim but never executes it twice.

A provider whose EOA becomes a MetaMask smart account (EIP-7702, the upgrade sponsored by the
relayer) claims by ERC-7710 instead: it signs framework Delegations (the Delegation Framework's npm
bytecode is on the twin), the relay hands one `redeemDelegations` to the relayer, the provider never
holds ETH and pays the relayer's fee in USDC inside the redemption; `disableDelegation` runs for
free, after which the relay refuses the delegation and the framework reverts it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from quotra.app import create_app
from quotra.chain import delegation as dlg
from quotra.chain import eip712
from quotra.chain.deployment import DelegationFramework, Deployment
from quotra.config import Settings
from quotra.money import format_usdc
from quotra.webhooks import Ed25519Signer
from quotra_dev import framework, twin
from quotra_dev.chain import Chain, account_from_key, new_account, sign_authorization
from quotra_dev.relayer import RelayerConfig, RelayerCore, create_relayer_app
from quotra_dev.relayer.local import ThreadedServer, deploy_escrow
from web3.exceptions import ContractCustomError

USDC = 10**6
DAY = 86_400
FEE = 10_000  # the local relayer's fee: 0.01 USDC
MASTER_KEY = "5e" * 32


class SlowSends:
    """ASGI wrapper of the relayer: answers `relayer_send7710Transaction` `delay` seconds late
    (the task is created at once; only the answer is slow)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.delay = 0.0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.delay:
            await self.app(scope, receive, send)
            return
        messages, more = [], True
        while more:
            message = await receive()
            messages.append(message)
            more = message.get("more_body", False)
        slow = any(b"relayer_send7710Transaction" in m.get("body", b"") for m in messages)
        replay = iter(messages)

        async def receive_again() -> Any:
            return next(replay, {"type": "http.disconnect"})

        async def send_late(message: Any) -> None:
            if slow and message["type"] == "http.response.start":
                await asyncio.sleep(self.delay)
            await send(message)

        await self.app(scope, receive_again, send_late)


@dataclass
class World:
    twin: twin.Twin
    chain: Chain
    deployment: Deployment
    operator: LocalAccount
    gas: LocalAccount
    relayer_app: Any
    slow: SlowSends
    relayer: ThreadedServer
    relay: ThreadedServer

    @property
    def core(self) -> RelayerCore:
        return self.relayer_app.state.core

    @property
    def escrow(self) -> Any:
        return self.chain.contract("QuotraEscrow", self.deployment.escrow)

    @property
    def fw(self) -> DelegationFramework:
        assert self.deployment.delegation_framework is not None
        return self.deployment.delegation_framework

    def balance(self, address: str) -> int:
        return int(self.chain.contract("MockUSDC", self.deployment.usdc).functions.balanceOf(address).call())

    def eth(self, address: str) -> int:
        return int(self.chain.w3.eth.get_balance(address))  # type: ignore[arg-type]

    def fund(self, provider: str, gross: int) -> int:
        """A consumer pays `gross` per x402, the operator settles it; returns the provider's share."""
        consumer = new_account()
        self.twin.mint_usdc(consumer.address, gross)
        auth = sign_authorization(consumer, self.deployment.usdc_domain, self.deployment.escrow, gross)
        self.chain.transact(
            self.escrow.functions.settle_authorizations([auth.payment(provider)]), self.operator
        )
        return gross - gross * self.deployment.fee_bps // 10_000

    def claimed_events(self, digest: str) -> list[Any]:
        return self.escrow.events.Claimed.get_logs(
            argument_filters={"delegation": HexBytes(digest)}, from_block=self.deployment.block
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("claims-e2e")
    with twin.start() as chain_:
        dev = [account_from_key(a.private_key) for a in chain_.accounts]
        owner, operator, gas = dev[0], dev[1], dev[2]
        deployment = deploy_escrow(chain_.rpc_url, owner, (operator.address,)).model_copy(
            update={"delegation_framework": chain_.framework}
        )
        deployment_file = deployment.save(tmp / "base-sepolia-twin.json")
        config = RelayerConfig(
            rpc_url=chain_.rpc_url,
            gas_account=gas,
            chain_id=deployment.chain_id,
            usdc=deployment.usdc,
            targets=(deployment.escrow,),
            signer=Ed25519Signer.generate(),
            min_fee=FEE,
            webhook_backoff=0.05,
            poll_interval=0.05,
            framework=chain_.framework,
        )
        relayer_app = create_relayer_app(config)
        slow = SlowSends(relayer_app)
        relay_port = twin.free_port()
        with ThreadedServer(slow, twin.free_port()) as relayer:
            settings = Settings(  # type: ignore[call-arg]
                _env_file=None,
                env="test",
                data_dir=tmp / "data",
                database_url=f"sqlite+aiosqlite:///{tmp / 'relay.db'}",
                master_key=MASTER_KEY,
                public_url=f"http://127.0.0.1:{relay_port}",
                log_json=False,
                chain_rpc_url=chain_.rpc_url,
                deployment_file=deployment_file,
                relayer="oneshot",
                relayer_url=relayer.url + "/relayers",
                relayer_timeout_seconds=1.0,
                claims_poll_seconds=0.1,
                claims_stale_seconds=0.3,
                prepaid_refresh_seconds=0,
                operator_key=operator.key.hex(),
                allowance_poll_seconds=0.2,
                signin_rate_per_minute=10_000,
                signin_rate_per_minute_ip=10_000,
            )
            with ThreadedServer(create_app(settings), relay_port) as relay:
                yield World(
                    chain_,
                    Chain(chain_.rpc_url),
                    deployment,
                    operator,
                    gas,
                    relayer_app,
                    slow,
                    relayer,
                    relay,
                )


async def sign_in(client: httpx.AsyncClient, account: LocalAccount) -> dict[str, str]:
    nonce = await client.post("/v1/auth/nonce", json={"address": account.address})
    message = nonce.json()["message"]
    signature = Account.sign_message(encode_defunct(text=message), account.key).signature.hex()
    reply = await client.post(
        "/v1/auth/verify", json={"message": message, "signature": "0x" + signature.removeprefix("0x")}
    )
    assert reply.status_code == 200, reply.text
    return {"Authorization": f"Bearer {reply.json()['access_token']}"}


async def wait_for(check: Callable[[], Awaitable[Any]], within: float = 20.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        if value := await check():
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def wallet_sign(account: LocalAccount, typed: dict[str, Any]) -> str:
    """What a wallet's eth_signTypedData_v4 returns for the typed data the relay proposed."""
    signed = Account.sign_typed_data(account.key, full_message=typed)
    return "0x" + bytes(signed.signature).hex()


def sign_delegation(world: World, provider: LocalAccount, **fields: Any) -> tuple[dict[str, Any], str]:
    message: dict[str, Any] = {
        "provider": provider.address,
        "delegate": world.gas.address,
        "payee": provider.address,
        "max_amount": USDC,
        "relayer_fee": FEE,
        "valid_until": int(time.time()) + 3600,
        "salt": int.from_bytes(Account.create().key[:8], "big"),
    }
    message.update(fields)
    signature = eip712.sign(provider.key, world.deployment.escrow_domain, "Delegation", message)
    return message, signature.hex


def digest_of(world: World, message: dict[str, Any]) -> str:
    return "0x" + eip712.digest(world.deployment.escrow_domain, "Delegation", message).hex()


@pytest.fixture
async def client(world: World) -> Any:
    async with httpx.AsyncClient(base_url=world.relay.url, timeout=30) as http:
        yield http


async def final_claim(client: httpx.AsyncClient, headers: dict[str, str], claim_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        claim = (await client.get(f"/v1/provider/claims/{claim_id}", headers=headers)).json()
        return claim if claim["status"] in ("confirmed", "failed") else None

    return await wait_for(done)


async def test_claim__zero_eth_provider__confirmed_with_exact_balances(
    world: World, client: httpx.AsyncClient
):
    provider = new_account()
    earned = world.fund(provider.address, 2 * USDC)
    headers = await sign_in(client, provider)
    fee_before = world.balance(world.gas.address)

    reply = await client.get("/v1/provider/claims/typed-data", params={"amount": "1.8"}, headers=headers)
    assert reply.status_code == 200, reply.text
    offer = reply.json()
    assert offer["relayer"] == {
        "relayer": "oneshot",
        "address": world.gas.address,
        "fee": "0.010000",
        "fee_atomic": FEE,
        "quote_expires_at": offer["relayer"]["quote_expires_at"],
    }
    message = offer["typed_data"]["message"]
    assert (message["max_amount"], message["relayer_fee"], message["delegate"]) == (
        str(earned),
        str(FEE),
        world.gas.address,
    )
    signature = wallet_sign(provider, offer["typed_data"])

    reply = await client.post(
        "/v1/provider/claims",
        json={"delegation": message, "signature": signature, "amount": "1.8"},
        headers=headers,
    )
    assert reply.status_code == 202, reply.text
    created = reply.json()
    assert created["status"] in ("requested", "submitted", "confirmed") and created["amount_atomic"] == earned
    claim = await final_claim(client, headers, created["id"])
    assert claim["status"] == "confirmed", claim
    assert claim["tx_hash"] and claim["block_number"] and claim["relayer_fee_atomic"] == FEE

    # Exact money: the payee gets the amount less the fee, the relayer exactly its fee, no ETH involved.
    assert world.balance(provider.address) == earned - FEE
    assert world.balance(world.gas.address) - fee_before == FEE
    assert world.escrow.functions.earnings(provider.address).call() == 0
    assert world.twin.web3().eth.get_balance(provider.address) == 0
    (event,) = world.claimed_events(offer["digest"])
    assert "0x" + bytes(event["transactionHash"]).hex() == claim["tx_hash"]
    assert (event["args"]["amount"], event["args"]["relayer"]) == (earned, world.gas.address)

    # The relayer reported through signed webhooks, which the relay accepted (2xx).
    world.relayer.call(world.core.idle)
    deliveries = [d for d in world.core.deliveries if d.task_id == claim["task_id"]]
    assert sorted((d.type, d.status_code) for d in deliveries) == [(0, 200), (4, 200)]

    listed = (await client.get("/v1/provider/claims", headers=headers)).json()
    assert [c["id"] for c in listed["data"]] == [claim["id"]]
    # A plain EOA's claim is the escrow's own Delegation: not a framework one to disable.
    kind = (await client.get("/v1/account/smart-account", headers=headers)).json()
    assert (kind["kind"], kind["erc7710"]) == ("eoa", False)
    reply = await client.get(f"/v1/provider/claims/{claim['id']}/disable/typed-data", headers=headers)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "not_an_erc7710_claim"
    reply = await client.get(f"/v1/provider/claims/clm_{'0' * 24}/disable/typed-data", headers=headers)
    assert reply.status_code == 404, reply.text
    earnings = (await client.get("/v1/provider/earnings", headers=headers)).json()
    assert (earnings["claimable_atomic"], earnings["claimed_atomic"], earnings["pending_atomic"]) == (
        0,
        earned,
        0,
    )
    assert earnings["claimed_via_relay_atomic"] == earned


async def test_refusals__revoked_and_over_cap__nothing_reaches_the_relayer(
    world: World, client: httpx.AsyncClient
):
    provider = new_account()
    earned = world.fund(provider.address, USDC)  # 0.9 USDC
    headers = await sign_in(client, provider)

    # A delegation revoked without ETH: a signed Revocation, submitted by the relayer.
    revoked, revoked_sig = sign_delegation(world, provider, max_amount=earned)
    item = digest_of(world, revoked)
    revocation_sig = eip712.sign(
        provider.key,
        world.deployment.escrow_domain,
        "Revocation",
        {"account": provider.address, "item": item},
    )
    reply = await client.post(
        "/v1/revocations", json={"account": provider.address, "item": item, "signature": revocation_sig.hex}
    )
    assert reply.status_code == 202, reply.text
    revocation_id = reply.json()["id"]

    async def revoked_onchain() -> bool:
        status = (await client.get(f"/v1/revocations/{revocation_id}")).json()["status"]
        return status == "confirmed"

    await wait_for(revoked_onchain)
    assert world.escrow.functions.revoked(provider.address, HexBytes(item)).call()

    sends, tasks = world.core.send_requests, len(world.core.tasks)
    reply = await client.post(
        "/v1/provider/claims", json={"delegation": revoked, "signature": revoked_sig}, headers=headers
    )
    assert (reply.status_code, reply.json()["error"]["code"]) == (409, "delegation_revoked")

    # Over the delegation's cap.
    # Its fee, pro rata, pays the relayer's minimum for a claim of 0.3 of its 0.5 USDC cap.
    capped, capped_sig = sign_delegation(world, provider, max_amount=USDC // 2, relayer_fee=2 * FEE)
    reply = await client.post(
        "/v1/provider/claims",
        json={"delegation": capped, "signature": capped_sig, "amount": "0.8"},
        headers=headers,
    )
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "delegation_cap_exceeded")
    assert "above the delegation's cap" in reply.json()["error"]["message"]

    # Above the earnings, another provider's delegation, a forged signature, a fee under the quote.
    big, big_sig = sign_delegation(world, provider, max_amount=10 * USDC)
    reply = await client.post(
        "/v1/provider/claims", json={"delegation": big, "signature": big_sig}, headers=headers
    )
    assert (reply.status_code, reply.json()["error"]["code"]) == (409, "insufficient_earnings")
    someone = new_account()
    theirs, theirs_sig = sign_delegation(world, someone)
    reply = await client.post(
        "/v1/provider/claims", json={"delegation": theirs, "signature": theirs_sig}, headers=headers
    )
    assert reply.status_code == 403
    forged = eip712.sign(someone.key, world.deployment.escrow_domain, "Delegation", capped).hex
    reply = await client.post(
        "/v1/provider/claims", json={"delegation": capped, "signature": forged}, headers=headers
    )
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "invalid_signature")
    cheap, cheap_sig = sign_delegation(world, provider, max_amount=USDC // 2, relayer_fee=FEE - 1)
    reply = await client.post(
        "/v1/provider/claims", json={"delegation": cheap, "signature": cheap_sig}, headers=headers
    )
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "relayer_fee_too_low")

    assert (world.core.send_requests, len(world.core.tasks)) == (sends, tasks)  # the relayer received nothing
    assert (await client.get("/v1/provider/claims", headers=headers)).json()["data"] == []

    # A cap partly used: the first claim goes, the second would exceed what is left.
    first = await client.post(
        "/v1/provider/claims",
        json={"delegation": capped, "signature": capped_sig, "amount": "0.3"},
        headers=headers,
    )
    assert first.status_code == 202, first.text
    assert (await final_claim(client, headers, first.json()["id"]))["status"] == "confirmed"
    sends = world.core.send_requests
    reply = await client.post(
        "/v1/provider/claims",
        json={"delegation": capped, "signature": capped_sig, "amount": "0.3"},
        headers=headers,
    )
    assert (reply.status_code, reply.json()["error"]["code"]) == (409, "delegation_cap_exceeded")
    assert "200000 of 500000 left" in reply.json()["error"]["message"]
    assert world.core.send_requests == sends


async def test_relayer_down__claim_stays_pending_then_completes_once(world: World, client: httpx.AsyncClient):
    provider = new_account()
    earned = world.fund(provider.address, USDC)
    headers = await sign_in(client, provider)
    message, signature = sign_delegation(world, provider, max_amount=earned)

    world.relayer.stop()
    try:
        reply = await client.post(
            "/v1/provider/claims", json={"delegation": message, "signature": signature}, headers=headers
        )
        assert reply.status_code == 202, reply.text
        claim_id = reply.json()["id"]
        assert reply.json()["status"] == "requested"
        await asyncio.sleep(1.0)  # the poller finds the relayer still down
        pending = (await client.get(f"/v1/provider/claims/{claim_id}", headers=headers)).json()
        assert (pending["status"], pending["tx_hash"]) == ("requested", None)
    finally:
        world.relayer.start()

    claim = await final_claim(client, headers, claim_id)
    assert claim["status"] == "confirmed", claim
    assert len(world.claimed_events(digest_of(world, message))) == 1
    assert world.balance(provider.address) == earned - FEE


async def test_relayer_slow__answer_times_out__claim_completes_once(world: World, client: httpx.AsyncClient):
    provider = new_account()
    earned = world.fund(provider.address, USDC)
    headers = await sign_in(client, provider)
    message, signature = sign_delegation(world, provider, max_amount=earned)

    world.slow.delay = 2.5  # longer than the relay's 1 s relayer timeout
    try:
        reply = await client.post(
            "/v1/provider/claims", json={"delegation": message, "signature": signature}, headers=headers
        )
        assert reply.status_code == 202, reply.text
        claim_id = reply.json()["id"]
        claim = await final_claim(client, headers, claim_id)
    finally:
        world.slow.delay = 0.0
    assert claim["status"] == "confirmed", claim
    world.relayer.call(world.core.idle)
    assert [t.id for t in world.core.tasks.values() if t.memo == claim_id] == [claim["task_id"]]
    assert len(world.claimed_events(digest_of(world, message))) == 1
    assert world.balance(provider.address) == earned - FEE
    assert to_checksum_address(claim["payee"]) == provider.address


# ---- ERC-7710: MetaMask smart accounts --------------------------------------------------------


def signed(account: LocalAccount, typed: dict[str, Any]) -> dict[str, Any]:
    """What a wallet returns for `eth_signTypedData_v4` of a Delegation, as the API takes it."""
    signature = Account.sign_typed_data(account.key, full_message=typed).signature
    return {"message": typed["message"], "signature": "0x" + bytes(signature).hex()}


def authorize(account: LocalAccount, upgrade: dict[str, Any]) -> dict[str, Any]:
    """The EIP-7702 authorization a wallet signs for the upgrade the relay asked for."""
    auth = Account.sign_authorization(upgrade, account.key)
    return {"chainId": auth.chain_id, "address": upgrade["address"], "nonce": auth.nonce,
            "yParity": auth.y_parity, "r": hex(auth.r), "s": hex(auth.s)}  # fmt: skip


async def offer(client: httpx.AsyncClient, headers: dict[str, str], amount: str) -> dict[str, Any]:
    reply = await client.get(
        "/v1/provider/claims/erc7710/typed-data", params={"amount": amount}, headers=headers
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


async def final_revocation(client: httpx.AsyncClient, revocation_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        revocation = (await client.get(f"/v1/revocations/{revocation_id}")).json()
        return revocation if revocation["status"] in ("confirmed", "failed") else None

    return await wait_for(done)


async def test_erc7710_claim__smart_account_provider_without_eth__confirmed(
    world: World, client: httpx.AsyncClient
) -> None:
    provider = new_account()
    earned = world.fund(provider.address, 2 * USDC)
    headers = await sign_in(client, provider)
    relayer_before = world.balance(world.gas.address)

    terms = await offer(client, headers, "1.8")
    assert terms["relayer"]["address"] == world.gas.address and terms["relayer"]["fee_atomic"] == FEE
    assert terms["authorization"] == {
        "chainId": world.deployment.chain_id,
        "address": world.fw.stateless_delegator,
        "nonce": 0,
    }
    assert terms["claim"]["domain"]["verifyingContract"] == world.fw.delegation_manager
    body = {
        "claim": signed(provider, terms["claim"]),
        "fee": signed(provider, terms["fee"]),
        "authorization": authorize(provider, terms["authorization"]),
    }
    reply = await client.post("/v1/provider/claims/erc7710", json=body, headers=headers)
    assert reply.status_code == 202, reply.text
    created = reply.json()
    assert (created["kind"], created["amount_atomic"], created["relayer_fee_atomic"]) == (
        "erc7710",
        earned,
        FEE,
    )
    claim = await final_claim(client, headers, created["id"])
    assert claim["status"] == "confirmed", claim

    # The provider's EOA is now MetaMask's stateless DeleGator; it paid the relayer in USDC, no ETH.
    assert dlg.is_delegated_to(world.chain.w3.eth.get_code(provider.address), world.fw.stateless_delegator)
    assert world.balance(provider.address) == earned - FEE
    assert world.balance(world.gas.address) - relayer_before == FEE
    assert world.escrow.functions.earnings(provider.address).call() == 0
    assert world.eth(provider.address) == 0
    receipt = world.chain.w3.eth.get_transaction_receipt(claim["tx_hash"])
    assert receipt["to"] == world.fw.delegation_manager

    # Nothing is left to claim: the same delegation again is refused.
    reply = await client.post(
        "/v1/provider/claims/erc7710", json=body | {"authorization": None}, headers=headers
    )
    assert reply.status_code == 409, reply.text  # no earnings left
    assert reply.json()["error"]["code"] == "insufficient_earnings"


async def test_erc7710_claim__refusals__nothing_sent(world: World, client: httpx.AsyncClient) -> None:
    provider = new_account()
    world.fund(provider.address, USDC)
    headers = await sign_in(client, provider)
    terms = await offer(client, headers, "0.5")
    claim, fee = signed(provider, terms["claim"]), signed(provider, terms["fee"])
    upgrade = authorize(provider, terms["authorization"])

    # Not a smart account and no authorization to make it one.
    reply = await client.post(
        "/v1/provider/claims/erc7710", json={"claim": claim, "fee": fee}, headers=headers
    )
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "not_a_smart_account"
    # Over the cap the provider signed.
    body: dict[str, Any] = {"claim": claim, "fee": fee, "authorization": upgrade, "amount": "0.6"}
    reply = await client.post("/v1/provider/claims/erc7710", json=body, headers=headers)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "delegation_cap_exceeded"
    # Not above the relayer's fee (it would cost the provider more than it claims).
    reply = await client.post("/v1/provider/claims/erc7710", json=body | {"amount": "0.01"}, headers=headers)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "amount_not_above_fee"
    # Caveats other than the relay's (another target): refused before anything reaches the relayer.
    tampered = dict(terms["claim"]["message"])
    tampered["caveats"] = [dict(c) for c in tampered["caveats"]]
    tampered["caveats"][0]["terms"] = world.deployment.usdc.lower()
    typed = terms["claim"] | {"message": tampered}
    body = {"claim": signed(provider, typed), "fee": fee, "authorization": upgrade}
    reply = await client.post("/v1/provider/claims/erc7710", json=body, headers=headers)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_delegation"
    # No fee for the relayer; a signature that is not the provider's.
    body = {"claim": claim, "fee": None, "authorization": upgrade}
    reply = await client.post("/v1/provider/claims/erc7710", json=body, headers=headers)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "relayer_fee_too_low"
    body = {"claim": signed(new_account(), terms["claim"]), "fee": fee, "authorization": upgrade}
    reply = await client.post("/v1/provider/claims/erc7710", json=body, headers=headers)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_signature"
    listed = (await client.get("/v1/provider/claims", headers=headers)).json()
    assert listed["data"] == []
    assert world.eth(provider.address) == 0


async def test_erc7710_claim__relayer_down__pending_then_redeemed_once(
    world: World, client: httpx.AsyncClient
):
    provider = new_account()
    earned = world.fund(provider.address, USDC)
    headers = await sign_in(client, provider)
    terms = await offer(client, headers, format_usdc(earned))
    body = {
        "claim": signed(provider, terms["claim"]),
        "fee": signed(provider, terms["fee"]),
        "authorization": authorize(provider, terms["authorization"]),
    }
    world.relayer.stop()
    try:
        reply = await client.post("/v1/provider/claims/erc7710", json=body, headers=headers)
        assert reply.status_code == 202, reply.text
        assert reply.json()["status"] == "requested"
        claim_id = reply.json()["id"]
    finally:
        world.relayer.start()

    claim = await final_claim(client, headers, claim_id)
    assert claim["status"] == "confirmed", claim
    claimed = world.escrow.events.Claimed.get_logs(
        argument_filters={"provider": provider.address}, from_block=world.deployment.block
    )
    assert [e["args"]["amount"] for e in claimed] == [earned]  # resent as signed, redeemed once
    assert world.balance(provider.address) == earned - FEE
    assert world.eth(provider.address) == 0


async def test_erc7710_claim__relayer_down__its_delegation_disabled_by_claim_id__never_redeemed(
    world: World, client: httpx.AsyncClient
):
    provider = new_account()
    world.chain.upgrade(provider, world.fw.stateless_delegator, world.gas)
    earned = world.fund(provider.address, USDC)
    headers = await sign_in(client, provider)
    kind = (await client.get("/v1/account/smart-account", headers=headers)).json()
    assert (kind["kind"], kind["erc7710"], kind["delegation_manager"]) == (
        "metamask_eip7702",
        True,
        world.fw.delegation_manager,
    )
    terms = await offer(client, headers, format_usdc(earned))
    body = {"claim": signed(provider, terms["claim"]), "fee": signed(provider, terms["fee"])}
    world.relayer.stop()
    try:
        reply = await client.post("/v1/provider/claims/erc7710", json=body, headers=headers)
        assert reply.status_code == 202 and reply.json()["status"] == "requested", reply.text
        claim_id = reply.json()["id"]
        # The claim's delegation, rebuilt by the relay, to disable through the relayer holding it.
        reply = await client.get(f"/v1/provider/claims/{claim_id}/disable/typed-data", headers=headers)
        assert reply.status_code == 200, reply.text
        grant = reply.json()
        assert grant["delegation"] == terms["claim"]["message"]
        body = {"delegation": grant["delegation"], "grant": signed(provider, grant["typed_data"])}
        reply = await client.post("/v1/delegations/disable", json=body)
        assert reply.status_code == 202 and reply.json()["kind"] == "delegation", reply.text
        revocation_id = reply.json()["id"]
    finally:
        world.relayer.start()

    # The relay never sends the claim again; the relayer disables the delegation on-chain.
    assert (await final_revocation(client, revocation_id))["status"] == "confirmed"
    claim = await final_claim(client, headers, claim_id)
    assert (claim["status"], claim["error"]) == ("failed", "delegation revoked")
    (listed,) = (await client.get("/v1/provider/claims", headers=headers)).json()["data"]
    assert listed["delegation_revoked"] is True
    manager = world.chain.w3.eth.contract(
        address=to_checksum_address(world.fw.delegation_manager), abi=framework.abi("DelegationManager")
    )
    digest = HexBytes(claim["delegation_digest"])
    assert manager.functions.disabledDelegations(digest).call() is True
    assert world.escrow.functions.earnings(provider.address).call() == earned
    assert world.eth(provider.address) == 0


async def test_disable_delegation__gasless__then_claims_refused(
    world: World, client: httpx.AsyncClient
) -> None:
    provider = new_account()
    world.chain.upgrade(provider, world.fw.stateless_delegator, world.gas)
    world.fund(provider.address, USDC)
    headers = await sign_in(client, provider)
    terms = await offer(client, headers, "0.5")
    assert terms["authorization"] is None  # already a smart account
    claim, fee = signed(provider, terms["claim"]), signed(provider, terms["fee"])

    reply = await client.post("/v1/delegations/disable/typed-data", json={"delegation": claim["message"]})
    assert reply.status_code == 200, reply.text
    grant = reply.json()
    target = dlg.Delegation.from_message(claim["message"])
    assert grant["hash"] == "0x" + target.hash.hex()
    body = {"delegation": claim["message"], "grant": signed(provider, grant["typed_data"])}
    reply = await client.post("/v1/delegations/disable", json=body)
    assert reply.status_code == 202, reply.text
    revocation = await final_revocation(client, reply.json()["id"])
    assert revocation["status"] == "confirmed", revocation
    assert world.eth(provider.address) == 0

    manager = world.chain.w3.eth.contract(
        address=to_checksum_address(world.fw.delegation_manager), abi=framework.abi("DelegationManager")
    )
    assert manager.functions.disabledDelegations(target.hash).call() is True
    reply = await client.post(
        "/v1/provider/claims/erc7710", json={"claim": claim, "fee": fee}, headers=headers
    )
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "delegation_revoked"
    # And on-chain the framework refuses it: CannotUseADisabledDelegation.
    signed_claim = target.signed(bytes.fromhex(claim["signature"][2:]))
    entries = dlg.claim_redemptions(
        signed_claim, None, escrow=world.deployment.escrow, usdc=world.deployment.usdc,
        amount=USDC // 4, payee=provider.address, fee_collector=world.gas.address, fee_amount=0,
    )  # fmt: skip
    call = {"from": world.gas.address, "to": world.fw.delegation_manager, "data": dlg.encode_redeem(entries)}
    with pytest.raises(ContractCustomError) as caught:
        world.chain.w3.eth.call(call)  # type: ignore[arg-type]
    assert dlg.describe_revert(caught.value.data) == "CannotUseADisabledDelegation"  # type: ignore[arg-type]


# ---- last, as they move the twin's clock: periodic allowances, ETH-free exits --------------------


@dataclass
class Granted:
    """A consumer smart account (no ETH) and its signed periodic allowance to the operator."""

    consumer: LocalAccount
    headers: dict[str, str]
    grant: dlg.Delegation
    typed: dict[str, Any]
    start: int
    context: str


async def grant_allowance(world: World, client: httpx.AsyncClient) -> Granted:
    consumer = new_account()
    world.twin.mint_usdc(consumer.address, 50 * USDC)
    world.chain.upgrade(consumer, world.fw.stateless_delegator, world.gas)  # sponsored: no ETH
    headers = await sign_in(client, consumer)
    start = int(world.chain.w3.eth.get_block("latest")["timestamp"])
    grant = dlg.periodic_allowance(
        world.fw,
        consumer=consumer.address,
        delegate=world.operator.address,
        usdc=world.deployment.usdc,
        period_amount=5 * USDC,
        period_duration=DAY,
        start=start,
        expiry=start + 30 * DAY,
        salt=7,
    )
    typed = grant.typed_data(dlg.domain(world.deployment.chain_id, world.fw.delegation_manager))
    signature = bytes.fromhex(wallet_sign(consumer, typed)[2:])
    context = "0x" + dlg.encode_context([grant.signed(signature)]).hex()
    return Granted(consumer, headers, grant.signed(signature), typed, start, context)


async def request_withdrawal(client: httpx.AsyncClient, granted: Granted, amount: str) -> None:
    """The consumer's signed RequestWithdrawal, relayed: its available deposit drops."""
    query = {"step": "request", "amount": amount}
    reply = await client.get("/v1/account/withdrawals/typed-data", params=query, headers=granted.headers)
    typed = reply.json()["typed_data"]
    body = {"step": "request", "message": typed["message"], "signature": wallet_sign(granted.consumer, typed)}
    reply = await client.post("/v1/account/withdrawals", json=body, headers=granted.headers)
    assert reply.status_code in (200, 202), reply.text


async def test_allowance__auto_top_up__at_most_the_period_amount_per_period(
    world: World, client: httpx.AsyncClient
):
    granted = await grant_allowance(world, client)
    consumer, headers, grant, typed, start, context = (
        granted.consumer, granted.headers, granted.grant, granted.typed, granted.start, granted.context,
    )  # fmt: skip
    # What MetaMask's wallet_grantPermissions answered (older shape): the context is what counts.
    response = {
        "chainId": hex(world.deployment.chain_id),
        "context": context,
        "expiry": start + 30 * DAY,
        "signerMeta": {"delegationManager": world.fw.delegation_manager},
        "permission": {"type": "erc20-token-periodic", "data": {"periodAmount": hex(5 * USDC)}},
    }
    reply = await client.post("/v1/account/allowances", json=response, headers=headers)
    assert reply.status_code == 201, reply.text
    assert (reply.json()["period_amount_atomic"], reply.json()["available_now_atomic"]) == (
        5 * USDC,
        5 * USDC,
    )
    forged = grant.signed(bytes.fromhex(wallet_sign(new_account(), typed)[2:]))
    bad = {"context": "0x" + dlg.encode_context([forged]).hex()}
    reply = await client.post("/v1/account/allowances", json=bad, headers=headers)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_signature"

    def deposit() -> int:
        return int(world.escrow.functions.deposits(consumer.address).call())

    async def deposited(amount: int) -> bool:
        return deposit() == amount

    await wait_for(lambda: deposited(5 * USDC))
    listed = (await client.get("/v1/account/allowances", headers=headers)).json()["data"]
    assert [(a["top_ups"], a["topped_up_atomic"]) for a in listed] == [(1, 5 * USDC)]
    # The deposit drops below the low-water mark (a withdrawal is requested): the period is spent,
    # so nothing more until the next period, which adds the period amount once.
    await request_withdrawal(client, granted, "5")
    listed = (await client.get("/v1/account/allowances", headers=headers)).json()["data"]
    assert [a["available_now_atomic"] for a in listed] == [0]
    world.twin.rpc("evm_setNextBlockTimestamp", hex(start + DAY))
    world.twin.rpc("evm_mine")
    await wait_for(lambda: deposited(10 * USDC))
    listed = (await client.get("/v1/account/allowances", headers=headers)).json()["data"]
    assert listed[0]["available_now_atomic"] == 0 and listed[0]["last_error"] is None
    assert (listed[0]["top_ups"], listed[0]["topped_up_atomic"]) == (2, 10 * USDC)  # one per period
    assert world.balance(consumer.address) == 40 * USDC

    # Revoked any time without ETH: disableDelegation through the relayer; no more top-ups.
    offer = (
        await client.post("/v1/delegations/disable/typed-data", json={"delegation": typed["message"]})
    ).json()
    body = {"delegation": typed["message"], "grant": signed(consumer, offer["typed_data"])}
    reply = await client.post("/v1/delegations/disable", json=body)
    assert reply.status_code == 202 and reply.json()["kind"] == "allowance", reply.text
    assert (await final_revocation(client, reply.json()["id"]))["status"] == "confirmed"
    listed = (await client.get("/v1/account/allowances", headers=headers)).json()["data"]
    assert listed[0]["revoked"] is True
    assert world.eth(consumer.address) == 0
    assert world.balance(world.deployment.escrow) == world.escrow.functions.liabilities().call()


async def test_allowance__disabled_from_the_wallet__top_up_refused_and_allowance_dropped(
    world: World, client: httpx.AsyncClient
):
    granted = await grant_allowance(world, client)
    reply = await client.post(
        "/v1/account/allowances", json={"context": granted.context}, headers=granted.headers
    )
    assert reply.status_code == 201, reply.text
    deposits = world.escrow.functions.deposits

    async def topped_up() -> bool:
        return bool(deposits(granted.consumer.address).call() == 5 * USDC)

    await wait_for(topped_up)
    # The consumer disables it without the relay (a grant any relayer redeems), then needs more.
    off = dlg.disable_delegation(
        world.fw,
        delegator=granted.consumer.address,
        delegate=world.gas.address,
        target=granted.grant,
        salt=11,
    )
    domain = dlg.domain(world.deployment.chain_id, world.fw.delegation_manager)
    off = off.signed(bytes.fromhex(wallet_sign(granted.consumer, off.typed_data(domain))[2:]))
    redemption = dlg.disable_redemption(off, granted.grant, world.fw.delegation_manager)
    world.chain.send(world.fw.delegation_manager, dlg.encode_redeem([redemption]), world.gas)
    await request_withdrawal(client, granted, "5")
    world.twin.rpc("evm_setNextBlockTimestamp", hex(granted.start + DAY))
    world.twin.rpc("evm_mine")

    async def dropped() -> dict[str, Any] | None:
        listed = (await client.get("/v1/account/allowances", headers=granted.headers)).json()["data"]
        return listed[0] if listed[0]["revoked"] else None

    allowance = await wait_for(dropped)
    assert allowance["last_error"] == "CannotUseADisabledDelegation"
    assert deposits(granted.consumer.address).call() == 5 * USDC
    assert world.eth(granted.consumer.address) == 0


async def test_allowance__typed_data_from_the_relay__registered_signed__revoked(
    world: World, client: httpx.AsyncClient
):
    consumer = new_account()
    world.twin.mint_usdc(consumer.address, 10 * USDC)
    world.chain.upgrade(consumer, world.fw.stateless_delegator, world.gas)
    headers = await sign_in(client, consumer)
    now = int(world.chain.w3.eth.get_block("latest")["timestamp"])
    query: dict[str, Any] = {"period_amount": "3", "period_seconds": DAY, "expiry": now - 1}
    reply = await client.get("/v1/account/allowances/typed-data", params=query, headers=headers)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_permission"
    query["expiry"] = now + 30 * DAY
    reply = await client.get("/v1/account/allowances/typed-data", params=query, headers=headers)
    assert reply.status_code == 200, reply.text
    typed = reply.json()["typed_data"]
    grant = dlg.Delegation.from_message(typed["message"])
    assert (grant.delegator, grant.delegate) == (consumer.address, world.operator.address)
    assert reply.json()["hash"] == "0x" + grant.hash.hex()

    permission = signed(consumer, typed)
    both = {"delegation": permission, "context": "0x" + dlg.encode_context([grant]).hex()}
    reply = await client.post("/v1/account/allowances", json=both, headers=headers)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_request"
    reply = await client.post("/v1/account/allowances", json={"delegation": permission}, headers=headers)
    assert reply.status_code == 201, reply.text
    assert (reply.json()["period_amount_atomic"], reply.json()["delegation"]) == (3 * USDC, typed["message"])

    async def topped_up() -> dict[str, Any] | None:
        listed = (await client.get("/v1/account/allowances", headers=headers)).json()["data"]
        return listed[0] if listed[0]["top_ups"] == 1 else None

    allowance = await wait_for(topped_up)
    assert (allowance["topped_up_atomic"], allowance["available_now_atomic"]) == (3 * USDC, 0)
    assert world.escrow.functions.deposits(consumer.address).call() == 3 * USDC
    offer_ = await client.post(
        "/v1/delegations/disable/typed-data", json={"delegation": allowance["delegation"]}
    )
    body = {"delegation": allowance["delegation"], "grant": signed(consumer, offer_.json()["typed_data"])}
    reply = await client.post("/v1/delegations/disable", json=body)
    assert reply.status_code == 202 and reply.json()["kind"] == "allowance", reply.text
    assert (await final_revocation(client, reply.json()["id"]))["status"] == "confirmed"
    listed = (await client.get("/v1/account/allowances", headers=headers)).json()["data"]
    assert listed[0]["revoked"] is True and world.eth(consumer.address) == 0


async def test_withdrawal__signed_steps_through_the_relayer__no_eth(world: World, client: httpx.AsyncClient):
    consumer = new_account()
    headers = await sign_in(client, consumer)
    usdc = world.chain.contract("MockUSDC", world.deployment.usdc)
    world.twin.mint_usdc(world.operator.address, 3 * USDC)
    world.chain.transact(usdc.functions.approve(world.deployment.escrow, 3 * USDC), world.operator)
    world.chain.transact(world.escrow.functions.deposit(3 * USDC, consumer.address), world.operator)

    async def step(name: str, **params: str) -> dict[str, Any]:
        query = {"step": name, **params}
        reply = await client.get("/v1/account/withdrawals/typed-data", params=query, headers=headers)
        assert reply.status_code == 200, reply.text
        typed = reply.json()["typed_data"]
        body = {"step": name, "message": typed["message"], "signature": wallet_sign(consumer, typed)}
        reply = await client.post("/v1/account/withdrawals", json=body, headers=headers)
        assert reply.status_code in (200, 202), reply.text

        async def done() -> dict[str, Any] | None:
            task = reply.json()["task_id"]
            seen = (await client.get(f"/v1/account/withdrawals/{task}", headers=headers)).json()
            return seen if seen["status"] != "submitted" else None

        result = await wait_for(done)
        assert result["status"] == "confirmed", result
        return result

    await step("request", amount="2")
    assert world.escrow.functions.withdrawals(consumer.address).call()[0] == 2 * USDC
    await step("cancel")
    assert world.escrow.functions.withdrawals(consumer.address).call()[0] == 0
    await step("request", amount="3")
    early = await client.get(
        "/v1/account/withdrawals/typed-data", params={"step": "withdraw"}, headers=headers
    )
    assert early.status_code == 409 and early.json()["error"]["code"] == "withdrawal_locked"

    world.twin.rpc("evm_increaseTime", hex(world.deployment.withdrawal_delay))
    world.twin.rpc("evm_mine")
    relayer_before = world.balance(world.gas.address)
    await step("withdraw")
    assert world.balance(consumer.address) == 3 * USDC - FEE
    assert world.balance(world.gas.address) - relayer_before == FEE
    assert world.escrow.functions.deposits(consumer.address).call() == 0
    assert world.eth(consumer.address) == 0
    assert world.balance(world.deployment.escrow) == world.escrow.functions.liabilities().call()
