"""Quotra's side of the relay benchmark: the chain, a relay, its paying callers, and the books.

- `start_chain`: a Base Sepolia twin (`quotra.chain.twin`) with the compiled escrow deployed by
  web3 (as bench/gas.py does) and operators set.
- `start_relay`: `quotra serve` as its own process (one uvicorn worker, SQLite or PostgreSQL, the
  settlement worker and indexer on, the direct relayer, the playground's free-call limit and the
  consumer rate limit raised so the bench is never refused).
- `QuotraCallers.create`: what the demo does, through the relay's API: a provider signs in with
  Ethereum and lists the mock upstream (`openai-compatible`, a fixed price per call); a prepaid
  consumer deposits gaslessly, signs a spend permission and creates an API key; x402 payers get
  USDC. `x402_headers(n)` writes n fresh, single-use `PAYMENT-SIGNATURE` values: the first per
  payer made by the stock x402 SDK client from the relay's own 402 offer, the rest by the same
  EIP-712 signing with a new nonce (coincurve: ~0.1 ms each instead of the SDK's ~2 ms), each
  checked by the relay's own `x402.verify` before use.
- `Books`: calls served (the relay's call records) == charges recorded (x402 payments and prepaid
  charges in its database) == settled (their state) == what moved on chain (payers' USDC, the
  consumer's deposit, the provider's earnings; run.py checks the platform fee across relays).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from quotra.chain import eip712
from quotra.payments import x402 as qx402
from quotra_dev import twin
from quotra_dev.chain import Chain, account_from_key, new_account, read_usdc_domain, sign_authorization
from quotra_dev.demo.marketplace import Process, quotra_argv
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from web3.contract import Contract

USDC = 10**6
MAX_BPS = 10_000
PRICE_ATOMIC = 100  # 0.0001 USDC per call, the smallest price a listing may ask
PREPAID_DEPOSIT = 1_000 * USDC
X402_PAYER_USDC = 10_000 * USDC
# Call states (quotra.calls.records): served = every state past the reservation but `voided`.
SERVED = ("captured", "settling", "reconciling", "settled", "failed", "refunded")
CHARGED = ("captured", "settling", "reconciling", "settled")
FINAL = ("settled", "voided", "refunded", "failed")


class BenchError(RuntimeError):
    """A benchmark step failed (the message says which)."""


# ---- the chain ----------------------------------------------------------------------------------


@dataclass
class ChainSetup:
    twin: twin.Twin
    chain: Chain
    escrow: Contract
    usdc: Contract
    owner: LocalAccount
    operators: list[LocalAccount]
    start_block: int
    usdc_domain: eip712.Domain

    def balance(self, address: str) -> int:
        return int(self.usdc.functions.balanceOf(address).call())


def start_chain(stack: contextlib.ExitStack, operators: int = 2) -> ChainSetup:
    chain_ = stack.enter_context(twin.start())
    c = Chain(chain_.rpc_url)
    dev = [account_from_key(a.private_key) for a in chain_.accounts]
    owner, ops = dev[0], [dev[1], *dev[3 : 3 + operators - 1]]
    start_block = int(c.w3.eth.block_number)
    escrow = c.deploy("QuotraEscrow", owner, chain_.usdc, 3_600, 86_400)
    for op in ops:
        c.transact(escrow.functions.set_operator(op.address, True), owner)
    usdc = c.contract("MockUSDC", chain_.usdc)
    return ChainSetup(chain_, c, escrow, usdc, owner, ops, start_block, read_usdc_domain(usdc, c.chain_id))


# ---- the relay ----------------------------------------------------------------------------------


@dataclass
class Relay:
    name: str
    url: str
    process: Process
    database_url: str

    @property
    def pid(self) -> int:
        return self.process.popen.pid


def start_relay(
    name: str,
    setup: ChainSetup,
    operator: LocalAccount,
    database_url: str,
    workdir: Path,
    *,
    port: int,
    extra_env: dict[str, str] | None = None,
) -> Relay:
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTRA_")}
    env.update(
        {
            "PYTHONWARNINGS": "ignore",
            "QUOTRA_ENV": "dev",
            "QUOTRA_DATA_DIR": str(workdir / f"{name}-data"),
            "QUOTRA_DATABASE_URL": database_url,
            "QUOTRA_MASTER_KEY": secrets.token_hex(32),
            "QUOTRA_PUBLIC_URL": url,
            "QUOTRA_LOG_JSON": "false",
            "QUOTRA_LOG_LEVEL": "WARNING",
            "QUOTRA_CHAIN_RPC_URL": setup.twin.rpc_url,
            "QUOTRA_ESCROW_ADDRESS": setup.escrow.address,
            "QUOTRA_USDC_ADDRESS": setup.usdc.address,
            "QUOTRA_ESCROW_START_BLOCK": str(setup.start_block),
            "QUOTRA_OPERATOR_KEY": "0x" + bytes(operator.key).hex(),  # anvil's public dev keys
            "QUOTRA_RELAYER": "direct",
            "QUOTRA_UPSTREAM_ALLOW_PRIVATE": "true",
            "QUOTRA_PLAYGROUND_FREE_CALLS": str(10**9),
            "QUOTRA_PLAYGROUND_FREE_CALLS_PER_DAY": str(10**9),
            "QUOTRA_CONSUMER_RATE_PER_MINUTE": str(10**9),
            "QUOTRA_KEY_RATE_PER_MINUTE": str(10**9),
        }
    )
    env.update(extra_env or {})
    argv = [*quotra_argv(), "serve", "--port", str(port)]
    process = Process(f"quotra serve ({name})", argv, env, workdir / f"{name}.log")
    relay = Relay(name, url, process, database_url)
    try:
        process.wait_ready(url + "/healthz", timeout=60)
    except Exception:
        process.stop()
        raise
    return relay


# ---- callers ------------------------------------------------------------------------------------


def _expect(reply: httpx.Response, *statuses: int) -> dict[str, Any]:
    if reply.status_code not in statuses:
        raise BenchError(
            f"{reply.request.method} {reply.request.url.path}: {reply.status_code} {reply.text[:300]}"
        )
    body: dict[str, Any] = reply.json()
    return body


async def sign_in(client: httpx.AsyncClient, account: LocalAccount) -> dict[str, str]:
    nonce = _expect(await client.post("/v1/auth/nonce", json={"address": account.address}), 200, 201)
    signature = Account.sign_message(encode_defunct(text=nonce["message"]), account.key).signature
    token = _expect(
        await client.post(
            "/v1/auth/verify", json={"message": nonce["message"], "signature": "0x" + bytes(signature).hex()}
        ),
        200,
    )
    return {"Authorization": f"Bearer {token['access_token']}"}


@dataclass
class QuotraCallers:
    relay: Relay
    setup: ChainSetup
    model: str
    listing_id: str
    provider: LocalAccount
    consumer: LocalAccount
    api_key: str
    payers: list[LocalAccount]
    terms: qx402.PaymentTerms
    deposit: int
    earnings_before: int = 0
    _templates: dict[str, dict[str, Any]] = field(default_factory=dict)
    _next_payer: int = 0

    @classmethod
    def create(
        cls, relay: Relay, setup: ChainSetup, upstream: str, api_key: str, model: str, payers: int
    ) -> QuotraCallers:
        return asyncio.run(cls._create(relay, setup, upstream, api_key, model, payers))

    @classmethod
    async def _create(
        cls, relay: Relay, setup: ChainSetup, upstream: str, upstream_key: str, model: str, n_payers: int
    ) -> QuotraCallers:
        provider, consumer = new_account(), new_account()
        async with httpx.AsyncClient(base_url=relay.url, timeout=60) as client:
            headers = await sign_in(client, provider)
            listing = {
                "kind": "openai-compatible",
                "base_url": upstream,
                "api_key": upstream_key,
                "models": [model],
                "price_per_call": f"{PRICE_ATOMIC / USDC:.6f}",
            }
            listing_id = _expect(await client.post("/v1/listings", json=listing, headers=headers), 201)["id"]

            # Prepaid: a gasless deposit, one spend permission, an API key (as in `quotra demo`).
            setup.twin.mint_usdc(consumer.address, PREPAID_DEPOSIT)
            headers = await sign_in(client, consumer)
            auth = sign_authorization(
                consumer, setup.usdc_domain, setup.escrow.address, PREPAID_DEPOSIT,
                primary="ReceiveWithAuthorization", valid_before=int(time.time()) + 3_600,
            )  # fmt: skip
            body = {
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
            _expect(await client.post("/v1/account/deposits", json=body, headers=headers), 200, 202)
            deadline = time.monotonic() + 60
            while True:
                account = _expect(await client.get("/v1/account", headers=headers), 200)
                if int(account["deposit_atomic"]) >= PREPAID_DEPOSIT:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"the prepaid deposit did not land: {account}")
                await asyncio.sleep(0.2)
            typed = _expect(
                await client.get(
                    "/v1/account/permission/typed-data",
                    params={"allowance": f"{PREPAID_DEPOSIT // USDC}", "days": 30},
                    headers=headers,
                ),
                200,
            )
            signature = Account.sign_typed_data(consumer.key, full_message=typed["typed_data"]).signature
            _expect(
                await client.post(
                    "/v1/account/permission",
                    json={
                        "permission": typed["typed_data"]["message"],
                        "signature": "0x" + bytes(signature).hex(),
                    },
                    headers=headers,
                ),
                200,
            )
            key = _expect(await client.post("/v1/account/keys", json={"name": "bench"}, headers=headers), 201)

        payers = [new_account() for _ in range(n_payers)]
        for payer in payers:
            setup.twin.mint_usdc(payer.address, X402_PAYER_USDC)
        terms = qx402.PaymentTerms(
            chain_id=setup.chain.chain_id,
            asset=setup.usdc.address,
            asset_name=setup.usdc_domain.name,
            asset_version=setup.usdc_domain.version,
            pay_to=setup.escrow.address,
        )
        callers = cls(
            relay, setup, model, listing_id, provider, consumer, key["key"], payers, terms, PREPAID_DEPOSIT
        )
        f = setup.escrow.functions
        callers.earnings_before = int(f.earnings(provider.address).call())
        return callers

    # ---- x402 payment headers ---------------------------------------------------------------

    def _offer(self) -> Any:
        from x402.http import decode_payment_required_header

        header, _ = qx402.payment_required(
            self.terms,
            PRICE_ATOMIC,
            resource=f"{self.relay.url}/v1/chat/completions",
            description=f"One chat completion by Quotra listing {self.listing_id}",
        )
        return decode_payment_required_header(header)

    def _template(self, payer: LocalAccount) -> dict[str, Any]:
        """One payload made by the stock x402 client (`x402.mechanisms.evm.exact`)."""
        template = self._templates.get(payer.address)
        if template is None:
            from x402 import x402Client
            from x402.http import encode_payment_signature_header
            from x402.mechanisms.evm.exact.register import register_exact_evm_client
            from x402.mechanisms.evm.signers import EthAccountSigner

            client = x402Client()
            register_exact_evm_client(client, EthAccountSigner(payer))
            payload = client.create_payment_payload(self._offer())
            if asyncio.iscoroutine(payload):
                payload = asyncio.run(payload)
            template = json.loads(base64.b64decode(encode_payment_signature_header(payload)))
            self._templates[payer.address] = template
        return template

    def x402_headers(self, n: int, path: Path) -> Path:
        """Writes n fresh single-use PAYMENT-SIGNATURE values, one per line, round-robin over payers."""
        now = int(time.time())
        lines = []
        for i in range(n):
            payer = self.payers[(self._next_payer + i) % len(self.payers)]
            payload = json.loads(json.dumps(self._template(payer)))
            authorization = payload["payload"]["authorization"]
            nonce = secrets.token_bytes(32)
            valid_after = int(authorization["validAfter"])
            valid_before = now + self.terms.max_timeout_seconds
            message = {
                "from": payer.address,
                "to": self.terms.pay_to,
                "value": PRICE_ATOMIC,
                "validAfter": valid_after,
                "validBefore": valid_before,
                "nonce": nonce,
            }
            signature = eip712.sign(payer.key, self.terms.domain, "TransferWithAuthorization", message)
            authorization.update(validBefore=str(valid_before), nonce="0x" + nonce.hex())
            payload["payload"]["signature"] = signature.hex
            line = base64.b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()
            if i < len(self.payers):  # the relay's own check, once per payer and batch
                paid = qx402.decode({"payment-signature": line})
                assert paid is not None
                qx402.verify(paid, self.terms, PRICE_ATOMIC, int(time.time()))
            lines.append(line)
        self._next_payer = (self._next_payer + n) % len(self.payers)
        path.write_text("\n".join(lines) + "\n")
        return path


# ---- the books ----------------------------------------------------------------------------------


@dataclass
class Books:
    """The relay's records and the chain, for one listing."""

    calls: dict[str, int]  # gate -> calls recorded as served
    x402: dict[str, tuple[int, int]]  # call state -> (count, amount)
    prepaid: dict[str, tuple[int, int]]
    onchain_x402: int  # USDC the x402 payers lost
    onchain_prepaid: int  # what left the prepaid consumer's deposit
    onchain_earned: int  # the listing's provider: earnings credited since the start
    fee_bps: int
    solvent: bool

    def fees(self) -> int:
        """The platform's part of what settled (the escrow's fee rule)."""
        total = self.settled("x402")[1] + self.settled("prepaid")[1]
        return total * self.fee_bps // MAX_BPS

    def unsettled(self) -> int:
        return sum(c for s, (c, _) in self.x402.items() if s not in FINAL) + sum(
            c for s, (c, _) in self.prepaid.items() if s not in FINAL
        )

    def charged(self, kind: str) -> tuple[int, int]:
        rows = self.x402 if kind == "x402" else self.prepaid
        charged = [(c, a) for s, (c, a) in rows.items() if s in CHARGED]
        return sum(c for c, _ in charged), sum(a for _, a in charged)

    def settled(self, kind: str) -> tuple[int, int]:
        rows = self.x402 if kind == "x402" else self.prepaid
        done = [(c, a) for s, (c, a) in rows.items() if s == "settled"]
        return sum(c for c, _ in done), sum(a for _, a in done)


async def read_books(callers: QuotraCallers) -> Books:
    engine = create_async_engine(callers.relay.database_url)
    try:
        async with engine.connect() as db:
            rows = (
                await db.execute(
                    text(
                        "SELECT gate, state, count(*), coalesce(sum(amount), 0) FROM calls "
                        "WHERE listing_id = :listing GROUP BY gate, state"
                    ),
                    {"listing": callers.listing_id},
                )
            ).all()
    finally:
        await engine.dispose()
    s = callers.setup
    f = s.escrow.functions
    lost = sum(X402_PAYER_USDC - s.balance(p.address) for p in callers.payers)
    spent = callers.deposit - int(f.deposits(callers.consumer.address).call())
    earned = int(f.earnings(callers.provider.address).call()) - callers.earnings_before
    solvent = s.balance(s.escrow.address) == int(f.liabilities().call())
    calls: dict[str, int] = {}
    by_gate: dict[str, dict[str, tuple[int, int]]] = {"x402": {}, "prepaid": {}}
    for gate, state, count, amount in rows:
        if state in SERVED:
            calls[gate] = calls.get(gate, 0) + int(count)
        by_gate.setdefault(gate, {})[state] = (int(count), int(amount))
    x402, prepaid = by_gate["x402"], by_gate["prepaid"]
    return Books(calls, x402, prepaid, lost, spent, earned, int(f.fee_bps().call()), solvent)


async def wait_settled(callers: QuotraCallers, within: float = 180.0) -> Books:
    """Polls the relay's database (from this process) until nothing is left to settle."""
    deadline = time.monotonic() + within
    while True:
        books = await read_books(callers)
        if books.unsettled() == 0:
            return books
        if time.monotonic() > deadline:
            return books
        await asyncio.sleep(0.25)


@dataclass
class BooksCheck:
    lines: list[str]
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures


def check_books(books: Books, client: dict[str, dict[str, int]]) -> BooksCheck:
    """`client[kind]` = {"ok": 2xx answers, "unanswered": requests written but not answered}."""
    lines, failures = [], []
    total_settled = 0
    for kind, gate in (("x402", "x402"), ("prepaid", "prepaid")):
        ok = client.get(kind, {}).get("ok", 0)
        unanswered = client.get(kind, {}).get("unanswered", 0)
        served = books.calls.get(gate, 0)
        charged, charged_amount = books.charged(kind)
        settled, settled_amount = books.settled(kind)
        onchain = books.onchain_x402 if kind == "x402" else books.onchain_prepaid
        total_settled += settled_amount
        lines.append(
            f"| {kind} | {ok:,} | {unanswered:,} | {served:,} | {charged:,} | {settled:,} | "
            f"{settled_amount / USDC:.4f} | {onchain / USDC:.4f} |"
        )
        if not ok <= served <= ok + unanswered:
            failures.append(
                f"{kind}: the relay served {served} calls, clients got {ok} (+{unanswered} unanswered)"
            )
        if charged != served:
            failures.append(f"{kind}: {served} calls served but {charged} charges recorded")
        if settled != charged or settled_amount != charged_amount:
            failures.append(f"{kind}: {charged} charges recorded but {settled} settled")
        if settled_amount != settled * PRICE_ATOMIC:
            failures.append(f"{kind}: settled {settled_amount} atomic for {settled} calls at {PRICE_ATOMIC}")
        if onchain != settled_amount:
            failures.append(f"{kind}: {settled_amount} settled by the relay but {onchain} moved on chain")
    # Every price is a multiple of 100 atomic units, so the split is exact per call and per batch.
    share = total_settled - total_settled * books.fee_bps // MAX_BPS
    earned = books.onchain_earned / USDC
    lines.append(f"| provider's earnings | | | | | | {share / USDC:.4f} (expected) | {earned:.4f} |")
    if books.onchain_earned != share:
        failures.append(
            f"the escrow credited the provider {books.onchain_earned}, its {MAX_BPS - books.fee_bps} bps "
            f"of the {total_settled} settled is {share}"
        )
    if not books.solvent:
        failures.append("the escrow's USDC balance is not its liabilities()")
    return BooksCheck(lines, failures)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
