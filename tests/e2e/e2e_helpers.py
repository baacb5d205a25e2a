"""Helpers of the end-to-end tests (the fixtures that use them are in conftest.py)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from eth_account import Account
from eth_account.signers.local import LocalAccount
from quotra.chain import eip712, twin
from quotra.chain.client import EscrowClient
from quotra.chain.escrow import Chain, sign_authorization
from quotra.chain.relayer import DirectRelayer
from quotra.config import Settings
from quotra.store.payments_repo import PaymentsRepo, X402Row
from quotra.store.repositories import Store
from relay_helpers import MASTER_KEY, listing_body, sign
from web3.contract import Contract

FEE_BPS = 1_000
MAX_BPS = 10_000


def provider_share(amount: int) -> int:
    return amount - amount * FEE_BPS // MAX_BPS


@dataclass
class OnChain:
    twin: twin.Twin
    chain: Chain
    escrow: Contract
    usdc: Contract
    owner: LocalAccount
    operator: LocalAccount
    outsider: LocalAccount  # has ETH: submits authorizations straight to USDC (front-running)
    start_block: int

    @property
    def domain(self) -> eip712.Domain:
        return eip712.Domain("USDC", "2", self.chain.chain_id, self.usdc.address)

    def funded_payer(self, amount: int) -> LocalAccount:
        account: LocalAccount = Account.create()
        self.twin.mint_usdc(account.address, amount)
        return account

    def balance(self, account: str) -> int:
        return int(self.usdc.functions.balanceOf(account).call())

    def earnings(self, provider: str) -> int:
        return int(self.escrow.functions.earnings(provider).call())

    def excess(self) -> int:
        """What the escrow holds beyond what it owes: front-run payments (which a reconcile pays
        the provider for out of the operator's funds) awaiting the owner's sweep."""
        return self.balance(self.escrow.address) - int(self.escrow.functions.liabilities().call())

    def solvent(self) -> bool:
        return self.excess() >= 0


def relay_settings(
    onchain: OnChain, tmp_path: Path, database_url: str, url: str, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "env": "test",
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "master_key": MASTER_KEY,
        "public_url": url,
        "log_json": False,
        "listing_cache_ttl_seconds": 0.0,
        "playground_free_calls": 0,
        "upstream_allow_private": True,
        "chain_rpc_url": onchain.twin.rpc_url,
        "escrow_address": onchain.escrow.address,
        "escrow_start_block": onchain.start_block,
        "operator_key": "0x" + bytes(onchain.operator.key).hex(),
        "settlement_max_age_seconds": 0.2,
        "settlement_poll_seconds": 0.05,
        "settlement_retry_base_seconds": 0.1,
        "settlement_retry_max_seconds": 0.5,
        "indexer_poll_seconds": 0.2,
        "prepaid_refresh_seconds": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class Served:
    url: str
    app: Any
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@contextmanager
def serve_app(build: Callable[[str], Any]) -> Iterator[Served]:
    """Serve the app `build(url)` returns with uvicorn (lifespan on) in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = build(url)
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    served = Served(url, app, server, thread)
    try:
        yield served
    finally:
        served.stop()
        sock.close()


async def create_listing(url: str, provider: LocalAccount | None = None, **body: Any) -> dict[str, Any]:
    provider = provider or Account.create()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        nonce = await client.post("/v1/auth/nonce", json={"address": provider.address})
        message = nonce.json()["message"]
        token = await client.post(
            "/v1/auth/verify", json={"message": message, "signature": sign(provider, message)}
        )
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        reply = await client.post("/v1/listings", json=listing_body(**body), headers=headers)
        assert reply.status_code == 201, reply.text
        return reply.json()


async def wait_for(check: Callable[[], Awaitable[bool]], within: float = 20.0, poll: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(poll)


async def settled(url: str, settlement: str, within: float = 20.0) -> dict[str, Any]:
    """Polls `GET /v1/settlements/{id}` until the payment is final; returns its status."""
    result: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def final() -> bool:
            result.update((await client.get(f"/v1/settlements/{settlement}")).json())
            return result.get("status") in ("settled", "failed", "voided", "refunded")

        await wait_for(final, within)
    return result


# ---- worker-level kit: the repository, the chain client and the operator's relayer ----------------


@dataclass
class Kit:
    onchain: OnChain
    store: Store
    repo: PaymentsRepo
    client: EscrowClient
    relayer: DirectRelayer

    async def captured(
        self, payer: LocalAccount, provider: str, amount: int, valid_for: int = 300
    ) -> X402Row:
        """An x402 payment reserved and captured as the paid-call path leaves it."""
        auth = sign_authorization(
            payer,
            self.onchain.domain,
            self.onchain.escrow.address,
            amount,
            valid_before=int(time.time()) + valid_for,
            nonce=secrets.token_bytes(32),
        )
        payment_id = await self.repo.reserve_x402(
            payer=payer.address,
            nonce="0x" + auth.nonce.hex(),
            amount=amount,
            valid_after=0,
            valid_before=auth.valid_before,
            signature=auth.signature.hex,
            listing_id="lst_test",
            provider=provider,
            balance=2**62,
        )
        row = await self.repo.capture_x402(payment_id)
        assert row is not None
        return row
