"""Prepaid test support: a fake escrow (the chain reads the prepaid service makes), a relay whose
upstreams are real sandbox adapters or fakes, and a consumer that signs in, holds a deposit,
signs a SpendPermission and creates keys."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from eth_account import Account
from eth_utils import to_checksum_address
from fastapi import FastAPI
from quotra.app import create_app
from quotra.chain import eip712
from quotra.chain.relayer import ChainCall
from quotra.money import usdc
from quotra.payments.prepaid import PrepaidService
from quotra.store.prepaid_repo import AccountView, ApiKeyView
from relay_helpers import listing_body, sign_in

ESCROW = to_checksum_address("0x" + "e5" * 20)
OPERATOR = Account.create()
MAX_TOKENS = 50
WITHDRAWAL_UNLOCKS_AT = 1_900_000_000  # the fake chain's pending withdrawals unlock then


@dataclass
class FakeChain:
    """The escrow as the prepaid service reads it; tests set deposits, spent amounts, revocations."""

    escrow_address: str = ESCROW
    chain_id: int = 84532
    deposits: dict[str, int] = field(default_factory=dict)
    withdrawals: dict[str, int] = field(default_factory=dict)
    spent: dict[bytes, int] = field(default_factory=dict)
    revoked: set[tuple[str, bytes]] = field(default_factory=set)
    # (sender, beneficiary, amount) of the deposits each mined transaction made.
    receipts: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)
    fail: bool = False

    @property
    def escrow_domain(self) -> eip712.Domain:
        return eip712.escrow_domain(self.chain_id, self.escrow_address)

    def _check(self) -> None:
        if self.fail:
            raise ConnectionError("node unreachable")

    async def deposit_of(self, consumer: str) -> int:
        self._check()
        return self.deposits.get(consumer, 0)

    async def withdrawal_of(self, consumer: str) -> tuple[int, int]:
        self._check()
        amount = self.withdrawals.get(consumer, 0)
        return amount, WITHDRAWAL_UNLOCKS_AT if amount else 0

    async def permission_spent(self, digest: bytes) -> int:
        self._check()
        return self.spent.get(digest, 0)

    async def is_revoked(self, account: str, digest: bytes) -> bool:
        self._check()
        return (account, digest) in self.revoked

    async def usdc_domain(self) -> eip712.Domain:
        return eip712.Domain("USDC", "2", self.chain_id, "0x036CbD53842c5426634e7929541eC2318f3dCF7e")

    async def usdc_balance(self, account: str, block: int | None = None) -> int:
        return 0

    async def authorization_used(self, payer: str, nonce: bytes, block: int | None = None) -> bool:
        return False

    async def deposits_in(self, tx_hash: str) -> list[tuple[str, str, int]]:
        self._check()
        return self.receipts.get(tx_hash, [])

    def encode_deposit_with_authorization(self, *args: Any) -> ChainCall:
        raise AssertionError("the fake chain takes no deposits")


@dataclass
class PrepaidRelay:
    app: FastAPI
    client: httpx.AsyncClient
    chain: FakeChain

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    @property
    def prepaid(self) -> PrepaidService:
        prepaid: PrepaidService = self.runtime.prepaid
        return prepaid

    def openai(self, key: str) -> openai.AsyncOpenAI:
        """The official SDK pointed at the relay (in-process ASGI transport)."""
        return openai.AsyncOpenAI(
            base_url="http://testserver/v1", api_key=key, max_retries=0, http_client=self.client
        )

    async def provider_listing(self, **body: Any) -> dict[str, Any]:
        token = await sign_in(self.client, Account.create())
        reply = await self.client.post(
            "/v1/listings", json=listing_body(**body), headers={"Authorization": f"Bearer {token}"}
        )
        assert reply.status_code == 201, reply.text
        listing: dict[str, Any] = reply.json()
        return listing

    async def consumer(
        self,
        *,
        deposit: int = 0,
        allowance: int | None = None,
        days: int = 30,
        account: Any = None,
    ) -> Consumer:
        account = account or Account.create()
        self.chain.deposits[account.address] = deposit
        token = await sign_in(self.client, account)
        consumer = Consumer(self, account, {"Authorization": f"Bearer {token}"})
        if allowance is not None:
            reply = await consumer.sign_permission(allowance, days)
            assert reply.status_code == 200, reply.text
        return consumer


@dataclass
class Consumer:
    relay: PrepaidRelay
    account: Any
    headers: dict[str, str]

    @property
    def wallet(self) -> str:
        return str(self.account.address)

    async def typed_data(self, allowance: int, days: int = 30, **params: Any) -> dict[str, Any]:
        reply = await self.relay.client.get(
            "/v1/account/permission/typed-data",
            params={"allowance": usdc(allowance), "days": days, **params},
            headers=self.headers,
        )
        assert reply.status_code == 200, reply.text
        typed: dict[str, Any] = reply.json()["typed_data"]
        return typed

    async def sign_permission(
        self,
        allowance: int,
        days: int = 30,
        *,
        tamper: Callable[[dict[str, Any]], None] | None = None,
        **params: Any,
    ) -> httpx.Response:
        """Fetch the typed data, sign it as a wallet does (eth_signTypedData_v4), register it."""
        typed = await self.typed_data(allowance, days, **params)
        if tamper is not None:
            tamper(typed["message"])
        signed = Account.sign_typed_data(self.account.key, full_message=typed)
        return await self.register(typed["message"], "0x" + bytes(signed.signature).hex())

    async def register(self, message: dict[str, Any], signature: str) -> httpx.Response:
        return await self.relay.client.post(
            "/v1/account/permission",
            json={"permission": message, "signature": signature},
            headers=self.headers,
        )

    async def key(
        self, *, mode: str = "live", spend_cap: int | None = None, name: str = "test"
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "mode": mode}
        if spend_cap is not None:
            body["spend_cap"] = usdc(spend_cap)
        reply = await self.relay.client.post("/v1/account/keys", json=body, headers=self.headers)
        assert reply.status_code == 201, reply.text
        created: dict[str, Any] = reply.json()
        return created

    async def account_state(self) -> AccountView:
        view = await self.relay.prepaid.repo.get_account(self.wallet)
        assert view is not None
        return view

    async def key_state(self, key_id: str) -> ApiKeyView:
        (view,) = [k for k in await self.relay.prepaid.repo.list_keys(self.wallet) if k.id == key_id]
        return view

    async def get(self, path: str, **params: Any) -> dict[str, Any]:
        reply = await self.relay.client.get(path, params=params, headers=self.headers)
        assert reply.status_code == 200, reply.text
        data: dict[str, Any] = reply.json()
        return data


def prepaid_relay_factory(make_settings: Callable[..., Any]) -> Callable[..., Any]:
    @asynccontextmanager
    async def start(
        adapter_factory: Any = None, erc1271: Any = None, **overrides: Any
    ) -> AsyncIterator[PrepaidRelay]:
        values: dict[str, Any] = {"prepaid_refresh_seconds": 0, "prepaid_key_cache_seconds": 30}
        values.update(overrides)
        app = create_app(make_settings(**values), adapter_factory=adapter_factory, erc1271=erc1271)
        async with app.router.lifespan_context(app):
            chain = FakeChain()
            prepaid: PrepaidService = app.state.runtime.prepaid
            prepaid.chain = chain
            prepaid.operator = OPERATOR.address
            app.state.runtime.apps.chain = chain
            transport = httpx.ASGITransport(
                app=app, raise_app_exceptions=False, client=("203.0.113.9", 40000)
            )
            async with httpx.AsyncClient(
                transport=transport, base_url="http://testserver", timeout=60
            ) as client:
                yield PrepaidRelay(app, client, chain)

    return start
