"""Relays as real processes on the twin, for the crash and replica tests: `quotra serve` started,
SIGKILLed and restarted; the consumers that load them (x402 payers, a prepaid wallet); and the
books afterwards, read from the database, the chain and `quotra reconcile`."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from e2e_helpers import OnChain
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from quotra.chain import eip712
from quotra.store.models import Call
from quotra_dev.chain import sign_authorization
from quotra_dev.demo.marketplace import Process, quotra_argv
from relay_helpers import MASTER_KEY, listing_body
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

USDC = 10**6
CALL_HEADER = "quotra-call-id"
FINAL_STATES = ("settled", "voided", "failed", "refunded")  # a call's money has nowhere left to go


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def relay_env(onchain: OnChain, database_url: str, port: int, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTRA_")}
    env.update(
        {
            "QUOTRA_ENV": "test",
            "QUOTRA_DATA_DIR": str(data_dir),
            "QUOTRA_DATABASE_URL": database_url,
            "QUOTRA_MASTER_KEY": MASTER_KEY,
            "QUOTRA_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "QUOTRA_LOG_JSON": "false",
            "QUOTRA_LISTING_CACHE_TTL_SECONDS": "0",
            "QUOTRA_PLAYGROUND_FREE_CALLS": "0",
            "QUOTRA_CONSUMER_RATE_PER_MINUTE": "100000",
            "QUOTRA_KEY_RATE_PER_MINUTE": "100000",
            "QUOTRA_SIGNIN_RATE_PER_MINUTE": "10000",
            "QUOTRA_SIGNIN_RATE_PER_MINUTE_IP": "10000",
            "QUOTRA_CHAIN_RPC_URL": onchain.twin.rpc_url,
            "QUOTRA_ESCROW_ADDRESS": onchain.escrow.address,
            "QUOTRA_ESCROW_START_BLOCK": str(onchain.start_block),
            "QUOTRA_OPERATOR_KEY": "0x" + bytes(onchain.operator.key).hex(),
            "QUOTRA_SETTLEMENT_MAX_AGE_SECONDS": "0.5",
            "QUOTRA_SETTLEMENT_POLL_SECONDS": "0.1",
            "QUOTRA_SETTLEMENT_RETRY_BASE_SECONDS": "0.2",
            "QUOTRA_SETTLEMENT_RETRY_MAX_SECONDS": "1",
            "QUOTRA_INDEXER_POLL_SECONDS": "0.5",
            "QUOTRA_UPSTREAM_TIMEOUT_SECONDS": "10",
            "QUOTRA_CALL_TIMEOUT_SECONDS": "15",
            "QUOTRA_SWEEP_SECONDS": "1",
            "QUOTRA_PREPAID_REFRESH_SECONDS": "0",
        }
    )
    env.update(extra)
    return env


@dataclass
class RelayProcess:
    """`quotra serve` on a fixed port, restartable on the same database."""

    name: str
    env: dict[str, str]
    port: int
    logs: Path
    process: Process | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        argv = [*quotra_argv(), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = Process(self.name, argv, self.env, self.logs / f"{self.name}-{self.starts}.log")
        self.process.wait_ready(self.url + "/healthz", timeout=60)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup, whatever was in flight."""
        assert self.process is not None
        os.killpg(self.process.popen.pid, signal.SIGKILL)
        self.process.popen.wait(10)
        self.process.stop()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@contextmanager
def relays(*processes: RelayProcess) -> Iterator[tuple[RelayProcess, ...]]:
    try:
        yield processes
    finally:
        for process in processes:
            process.stop()


def quotra_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*quotra_argv(), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# ---- consumers ------------------------------------------------------------------------------------


async def sign_in(client: httpx.AsyncClient, account: LocalAccount) -> dict[str, str]:
    nonce = (await client.post("/v1/auth/nonce", json={"address": account.address})).json()
    signature = (
        "0x" + bytes(Account.sign_message(encode_defunct(text=nonce["message"]), account.key).signature).hex()
    )
    reply = await client.post("/v1/auth/verify", json={"message": nonce["message"], "signature": signature})
    assert reply.status_code == 200, reply.text
    return {"Authorization": f"Bearer {reply.json()['access_token']}"}


async def create_listing(url: str, provider: LocalAccount, **body: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        headers = await sign_in(client, provider)
        reply = await client.post("/v1/listings", json=listing_body(**body), headers=headers)
        assert reply.status_code == 201, reply.text
        return dict(reply.json())


def chat(listing_id: str, stream: bool, content: str = "crash me softly") -> dict[str, Any]:
    return {
        "model": f"listing/{listing_id}",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
    }


@dataclass
class X402Payer:
    """A wallet with USDC and no ETH, paying with freshly signed authorizations (never reused)."""

    onchain: OnChain
    account: LocalAccount
    offer: dict[str, Any]  # the listing's v2 requirements

    @classmethod
    async def funded(cls, onchain: OnChain, url: str, listing_id: str, balance: int) -> X402Payer:
        account: LocalAccount = Account.create()
        if balance:
            onchain.twin.mint_usdc(account.address, balance)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            reply = await client.post("/v1/chat/completions", json=chat(listing_id, False))
        assert reply.status_code == 402, reply.text
        required = json.loads(base64.b64decode(reply.headers["payment-required"]))
        return cls(onchain, account, required["accepts"][0])

    def header(self) -> tuple[str, str]:
        """A payment header (v2) and its nonce."""
        amount = int(self.offer["amount"])
        auth = sign_authorization(
            self.account,
            self.onchain.domain,
            self.offer["payTo"],
            amount,
            valid_before=int(time.time()) + int(self.offer["maxTimeoutSeconds"]),
            nonce=secrets.token_bytes(32),
        )
        payload = {
            "x402Version": 2,
            "accepted": self.offer,
            "payload": {
                "signature": auth.signature.hex,
                "authorization": {
                    "from": auth.payer,
                    "to": auth.to,
                    "value": str(auth.amount),
                    "validAfter": str(auth.valid_after),
                    "validBefore": str(auth.valid_before),
                    "nonce": "0x" + auth.nonce.hex(),
                },
            },
        }
        return base64.b64encode(json.dumps(payload).encode()).decode(), "0x" + auth.nonce.hex()


async def prepaid_key(
    onchain: OnChain, url: str, *, deposit: int, allowance: int, cap: int | None = None
) -> tuple[LocalAccount, str]:
    """A wallet that deposited `deposit` USDC itself, signed a permission of `allowance` and made
    an API key (capped at `cap`)."""
    wallet: LocalAccount = Account.create()
    onchain.twin.fund_eth(wallet.address, 10**18)
    onchain.twin.mint_usdc(wallet.address, deposit)
    if deposit:
        onchain.chain.transact(onchain.usdc.functions.approve(onchain.escrow.address, deposit), wallet)
        onchain.chain.transact(onchain.escrow.functions.deposit(deposit, wallet.address), wallet)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        headers = await sign_in(client, wallet)
        typed = (
            await client.get(
                "/v1/account/permission/typed-data",
                params={"allowance": f"{allowance / USDC:.6f}", "days": 30},
                headers=headers,
            )
        ).json()
        signature = (
            "0x"
            + bytes(Account.sign_typed_data(wallet.key, full_message=typed["typed_data"]).signature).hex()
        )
        reply = await client.post(
            "/v1/account/permission",
            json={"permission": typed["typed_data"]["message"], "signature": signature},
            headers=headers,
        )
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = {"name": "crash"}
        if cap is not None:
            body["spend_cap"] = f"{cap / USDC:.6f}"
        key = await client.post("/v1/account/keys", json=body, headers=headers)
        assert key.status_code == 201, key.text
    return wallet, str(key.json()["key"])


@dataclass
class Outcome:
    """What one request got back (or that it got nothing: the relay died under it)."""

    kind: str  # x402 | prepaid
    stream: bool
    status: int | None  # None: the connection broke
    call_id: str | None
    nonce: str | None = None
    events: list[Any] = field(default_factory=list)

    @property
    def served(self) -> bool:
        """Answered in full: 200, and a stream that ended with [DONE]."""
        return self.status == 200 and (not self.stream or (bool(self.events) and self.events[-1] == "[DONE]"))


async def call(
    client: httpx.AsyncClient,
    listing_id: str,
    *,
    stream: bool,
    headers: dict[str, str],
    kind: str,
    nonce: str | None,
) -> Outcome:
    try:
        if not stream:
            reply = await client.post("/v1/chat/completions", json=chat(listing_id, False), headers=headers)
            return Outcome(kind, False, reply.status_code, reply.headers.get(CALL_HEADER), nonce)
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat(listing_id, True), headers=headers
        ) as reply:
            text = (await reply.aread()).decode()
        events = [
            e if e == "[DONE]" else json.loads(e)
            for e in (line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: "))
        ]
        return Outcome(kind, True, reply.status_code, reply.headers.get(CALL_HEADER), nonce, events)
    except (httpx.TransportError, json.JSONDecodeError):
        return Outcome(kind, stream, None, None, nonce)


# ---- the books -------------------------------------------------------------------------------------


async def all_calls(database_url: str, listing_ids: list[str]) -> list[Call]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(select(Call).where(Call.listing_id.in_(listing_ids)))).all()
    finally:
        await engine.dispose()
    return [Call(**row._mapping) for row in rows]


async def wait_until(check: Any, within: float, what: str, poll: float = 0.25) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {within:.0f} s: {what}")
        await asyncio.sleep(poll)


def typed_signature(
    account: LocalAccount, domain: eip712.Domain, primary: str, message: dict[str, Any]
) -> str:
    return eip712.sign(account.key, domain, primary, message).hex
