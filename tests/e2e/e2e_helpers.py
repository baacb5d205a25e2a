"""Helpers of the end-to-end tests (the fixtures that use them are in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from eth_account import Account
from eth_account.signers.local import LocalAccount
from quotra.calls.outbox import Outbox, X402Payment
from quotra.calls.records import X402Hold
from quotra.calls.store import CallStore, Hold
from quotra.calls.store import Served as ServedCall
from quotra.chain import eip712
from quotra.chain.client import EscrowClient
from quotra.chain.relayer import DirectRelayer
from quotra.config import Settings
from quotra.store.db import create_engine
from quotra.store.models import Call, table, utcnow
from quotra.store.repositories import Store
from quotra_dev import twin
from quotra_dev.chain import Chain, account_from_key, sign_authorization
from relay_helpers import MASTER_KEY, listing_body, sign
from sqlalchemy import func, select
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

    def deposit(self, consumer: str) -> int:
        return int(self.escrow.functions.deposits(consumer).call())

    def credited(self, provider: str) -> tuple[int, int]:
        """(Σ amount, Σ fee) of the escrow's `Credited` events for `provider` (it is credited once
        per settlement it has payments in, and once per reconciled payment)."""
        events = self.escrow.events.Credited.get_logs(
            argument_filters={"provider": provider}, from_block=self.start_block
        )
        return sum(int(e["args"]["amount"]) for e in events), sum(int(e["args"]["fee"]) for e in events)

    def excess(self) -> int:
        """What the escrow holds beyond what it owes: front-run payments (which a reconcile pays
        the provider for out of the operator's funds) awaiting the owner's sweep."""
        return self.balance(self.escrow.address) - int(self.escrow.functions.liabilities().call())

    def solvent(self) -> bool:
        return self.excess() >= 0


def deploy_escrow(chain_: twin.Twin, withdrawal_delay: int = 3600) -> OnChain:
    """The escrow on a running twin: dev account 0 owns it, 1 is its operator, 2 an outsider."""
    chain = Chain(chain_.rpc_url)
    owner, operator, outsider = (account_from_key(a.private_key) for a in chain_.accounts[:3])
    usdc = chain.contract("MockUSDC", chain_.usdc)
    escrow = chain.deploy("QuotraEscrow", owner, chain_.usdc, withdrawal_delay, 86_400)
    chain.transact(escrow.functions.set_operator(operator.address, True), owner)
    return OnChain(chain_, chain, escrow, usdc, owner, operator, outsider, int(chain.w3.eth.block_number))


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
        "signin_rate_per_minute": 10_000,
        "signin_rate_per_minute_ip": 10_000,
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


async def sign_in(url: str, account: LocalAccount) -> dict[str, str]:
    """A sign-in (SIWE) session of `account`: the headers that carry it."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        nonce = await client.post("/v1/auth/nonce", json={"address": account.address})
        message = nonce.json()["message"]
        token = await client.post(
            "/v1/auth/verify", json={"message": message, "signature": sign(account, message)}
        )
        assert token.status_code == 200, token.text
        return {"Authorization": f"Bearer {token.json()['access_token']}"}


async def create_listing(url: str, provider: LocalAccount | None = None, **body: Any) -> dict[str, Any]:
    provider = provider or Account.create()
    headers = await sign_in(url, provider)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        reply = await client.post("/v1/listings", json=listing_body(**body), headers=headers)
        assert reply.status_code == 201, reply.text
        return reply.json()


async def settled_books(database_url: str) -> dict[str, tuple[int, int]]:
    """provider → (Σ amount, Σ fee) of the paid calls (x402, prepaid) the relay's `calls` table
    says are settled: what the escrow's `Credited` events for that provider must add up to."""
    calls = table(Call)
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    select(calls.c.provider, func.sum(calls.c.amount), func.sum(calls.c.fee))
                    .where(calls.c.state == "settled", calls.c.gate.in_(("x402", "prepaid")))
                    .group_by(calls.c.provider)
                )
            ).all()
    finally:
        await engine.dispose()
    return {str(provider): (int(amount), int(fee)) for provider, amount, fee in rows}


async def wait_for(check: Callable[[], Awaitable[bool]], within: float = 20.0, poll: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(poll)


async def settled(url: str, call_id: str, headers: dict[str, str], within: float = 20.0) -> dict[str, Any]:
    """Polls `GET /v1/calls/{id}` (as its payer: `headers`) until its money is final; the call."""
    result: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def final() -> bool:
            result.update((await client.get(f"/v1/calls/{call_id}", headers=headers)).json())
            return result.get("state") in ("settled", "failed", "voided", "refunded")

        await wait_for(final, within)
    return result


# ---- worker-level kit: the repository, the chain client and the operator's relayer ----------------


@dataclass
class Kit:
    onchain: OnChain
    store: Store
    calls: CallStore
    outbox: Outbox
    client: EscrowClient
    relayer: DirectRelayer

    async def captured(
        self, payer: LocalAccount, provider: str, amount: int, valid_for: int = 300
    ) -> X402Payment:
        """An x402 call reserved and finished (captured) as the paid-call path leaves it."""
        auth = sign_authorization(
            payer,
            self.onchain.domain,
            self.onchain.escrow.address,
            amount,
            valid_before=int(time.time()) + valid_for,
            nonce=secrets.token_bytes(32),
        )
        listing = await self.store.create_listing(
            id="lst_" + secrets.token_hex(6),
            owner=provider,
            kind="sandbox",
            base_url=None,
            models=["sandbox-model"],
            api_key_sealed="-",
            price_per_call=amount,
        )
        hold = Hold(payer.address, listing.id, provider, amount, utcnow() + timedelta(seconds=valid_for))
        call_id = await self.calls.reserve_x402(
            hold,
            X402Hold(
                payer=payer.address,
                nonce="0x" + auth.nonce.hex(),
                value=amount,
                valid_after=0,
                valid_before=auth.valid_before,
                signature=auth.signature.hex,
                request_hash="0" * 64,
                balance=2**62,
                block=int(self.onchain.chain.w3.eth.block_number),
            ),
        )
        served = ServedCall("sandbox-model", False, 1, 1, 1)
        assert await self.calls.finish(call_id, amount=amount, usage=served)
        row = await self.outbox.get_x402(call_id)
        assert row is not None and row.state == "captured"
        return row


class ChainProxy:
    """A TCP proxy in front of the twin's RPC, to take the chain away and give it back: `forward`
    (pass everything through), `refuse` (connections refused: the port is closed; how it starts)
    or `hang` (connections accepted, requests never answered: a frozen node)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = twin.free_port()
        self.mode = "refuse"
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def set(self, mode: str) -> None:
        assert mode in ("forward", "refuse", "hang")
        self.mode = mode
        for writer in list(self._open):  # connections of the old mode end with it
            writer.close()
        self._open.clear()
        if mode == "refuse" and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif mode != "refuse" and self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        if self.mode == "hang":
            with contextlib.suppress(ConnectionError):
                await reader.read()  # until the client gives up
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._open.add(up_writer)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        await self.set("refuse")
