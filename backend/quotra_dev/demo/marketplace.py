"""The marketplace half of the demo: issue 6's story with every piece running for real.

A Base Sepolia twin, the escrow deployed by `ape run deploy escrow`, the relay (`quotra serve`) and
the local gas relayer (`quotra relayer`) as subprocesses on free loopback ports, and a local
OpenAI-compatible model server. Then: a provider without ETH signs in with Ethereum and lists two
keys; a consumer without ETH browses, uses the free playground, pays per call with the stock x402
client, deposits gaslessly, signs a spend permission, creates an API key and streams through the
`openai` SDK; the settlement worker lands the batches; the provider claims by ERC-7710 (its EOA
becomes a MetaMask smart account by EIP-7702, and the relayer redeems its framework Delegations);
the consumer withdraws what is left of its deposit without ETH (signed steps the relayer submits);
and the books are checked against the chain (`quotra reconcile`, solvency, 90/10).

`run(console)` returns a `MarketplaceSummary`; every process is stopped on exit, error or Ctrl-C.
`run(console, keep=True)` leaves everything running and waits for Ctrl-C.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import httpx
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from quotra.chain.deployment import DEPLOYMENTS_DIR_ENV, Deployment
from quotra.money import format_usdc, parse_usdc
from rich.console import Console
from rich.table import Table

from quotra_dev import twin
from quotra_dev.chain import (
    Chain,
    account_from_key,
    new_account,
    sign_authorization,
)
from quotra_dev.demo.onchain import DEPLOYER_ALIAS, NETWORK, DemoError, deploy_with_ape

T = TypeVar("T")

MAX_BPS: Final = 10_000
LOCAL_API_KEY: Final = "sk-local-demo"
SANDBOX_MODEL: Final = "quotra-sandbox-mini"
LOCAL_MODEL: Final = "quotra-local-1"
CONSUMER_USDC: Final = "5"
DEPOSIT_USDC: Final = "2"
ALLOWANCE_USDC: Final = "1"
X402_CALLS: Final = 2
PREPAID_CALLS: Final = 2  # one plain, one streamed


@dataclass
class MarketplaceSummary:
    """What the story did and what the checks found (atomic USDC units, 6 decimals)."""

    relay_url: str = ""
    relayer_url: str = ""
    upstream_url: str = ""
    rpc_url: str = ""
    escrow: str = ""
    usdc: str = ""
    provider: str = ""
    consumer: str = ""
    operator: str = ""
    gas_relayer: str = ""
    api_key: str = ""
    consumer_key: str = ""  # throw-away twin keys, printed by --keep to act by hand
    provider_key: str = ""
    deployments_dir: str = ""
    listings: dict[str, str] = field(default_factory=dict)  # model -> listing id
    playground_calls: int = 0
    playground_refused_status: int = 0
    x402_paid: list[int] = field(default_factory=list)
    prepaid_paid: list[int] = field(default_factory=list)
    deposit: int = 0
    deposit_status: str = ""
    consumer_minted: int = 0
    consumer_wallet_after: int = 0
    consumer_deposit_after: int = 0
    provider_earned: int = 0  # escrow earnings credited before the claim
    claim_status: str = ""
    claim_amount: int = 0
    relayer_fee: int = 0
    claim_gas: int = 0
    withdrawn: int = 0  # the deposit withdrawn at the end, the relayer's fee included
    withdrawal_fee: int = 0
    withdrawal_status: str = ""
    provider_wallet_after: int = 0
    provider_earnings_after: int = 0
    platform_fees: int = 0
    fee_bps: int = 0
    escrow_balance: int = 0
    liabilities: int = 0
    reconcile_exit: int | None = None
    eth_balances: dict[str, int] = field(default_factory=dict)  # consumer/provider -> wei
    gas_per_call: list[tuple[str, int, int]] = field(default_factory=list)  # (path, gas, calls)
    tx_hashes: list[tuple[str, str]] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total_paid(self) -> int:
        return sum(self.x402_paid) + sum(self.prepaid_paid)

    @property
    def ok(self) -> bool:
        return (
            bool(self.checks)
            and self.reconcile_exit == 0
            and self.claim_status == "confirmed"
            and self.withdrawal_status == "confirmed"
        )


# ---- processes ------------------------------------------------------------------------------------


class Process:
    """A subprocess in its own process group, its output in a log file; stopped group-wide."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log_file: IO[bytes] = log.open("wb")
        self.popen = subprocess.Popen(  # noqa: S603 - fixed argv
            argv,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def last_line(self) -> str:
        try:
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def wait_ready(self, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise DemoError(f"`{self.name}` exited ({self.popen.returncode}): {self.last_line()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0).status_code < 500:
                    return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"`{self.name}` did not answer {url} within {timeout:.0f} s: {self.last_line()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, sig)
                try:
                    self.popen.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log_file.close()


def quotra_argv() -> list[str]:
    """The `quotra` command of this environment."""
    found = shutil.which("quotra", path=str(Path(sys.executable).parent)) or shutil.which("quotra")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from quotra.cli import main; sys.exit(main())"]


# ---- small helpers --------------------------------------------------------------------------------


def _decode(header: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(base64.b64decode(header))
    return result


def _error(reply: httpx.Response) -> str:
    try:
        body = reply.json()
        message = (
            body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("detail", body)
        )
    except (ValueError, KeyError, AttributeError):
        message = reply.text[:200]
    return f"{reply.request.method} {reply.request.url.path} answered {reply.status_code}: {message}"


def _expect(reply: httpx.Response, *statuses: int) -> dict[str, Any]:
    if reply.status_code not in statuses:
        raise DemoError(_error(reply))
    body: dict[str, Any] = reply.json()
    return body


async def _until(check: Callable[[], Awaitable[T | None]], what: str, within: float = 30.0) -> T:
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {within:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


def _wallet_sign_typed(account: LocalAccount, typed: dict[str, Any]) -> str:
    """What a wallet's eth_signTypedData_v4 returns for typed data the relay proposed."""
    return "0x" + bytes(Account.sign_typed_data(account.key, full_message=typed).signature).hex()


def _signed_delegation(account: LocalAccount, typed: dict[str, Any]) -> dict[str, Any]:
    """A framework Delegation as the relay takes it: its message and the wallet's signature."""
    return {"message": typed["message"], "signature": _wallet_sign_typed(account, typed)}


def _chat(model: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


# ---- the story ------------------------------------------------------------------------------------


class Marketplace:
    def __init__(
        self,
        console: Console,
        chain_: twin.Twin,
        deployment: Deployment,
        relay_url: str,
        relayer_url: str,
        upstream_url: str,
        summary: MarketplaceSummary,
    ) -> None:
        self.console = console
        self.twin = chain_
        self.deployment = deployment
        self.relay_url = relay_url
        self.relayer_url = relayer_url
        self.upstream_url = upstream_url
        self.summary = summary
        self.chain = Chain(chain_.rpc_url)
        self.w3 = self.chain.w3
        self.escrow = self.chain.contract("QuotraEscrow", deployment.escrow)
        self.usdc = self.chain.contract("MockUSDC", deployment.usdc)
        self.provider = new_account()  # fresh wallets: no ETH, ever
        self.consumer = new_account()
        self.settlements: list[tuple[str, str, int]] = []  # (path, call id, amount)
        self.x402_price = 0  # from the 402's offer
        self.consumer_headers: dict[str, str] = {}

    def step(self, title: str) -> None:
        self.console.rule(f"[bold]{title}")

    def say(self, text: str) -> None:
        self.console.print(f"  {text}", soft_wrap=True)

    def balance(self, address: str) -> int:
        return int(self.usdc.functions.balanceOf(to_checksum_address(address)).call())

    def eth(self, address: str) -> int:
        return int(self.w3.eth.get_balance(to_checksum_address(address)))

    async def sign_in(self, client: httpx.AsyncClient, account: LocalAccount) -> dict[str, str]:
        nonce = _expect(await client.post("/v1/auth/nonce", json={"address": account.address}), 200, 201)
        message = nonce["message"]
        signature = (
            "0x" + bytes(Account.sign_message(encode_defunct(text=message), account.key).signature).hex()
        )
        token = _expect(
            await client.post("/v1/auth/verify", json={"message": message, "signature": signature}), 200
        )
        return {"Authorization": f"Bearer {token['access_token']}"}

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.relay_url, timeout=30) as client:
            await self.provider_lists(client)
            await self.consumer_browses_and_plays(client)
            await self.consumer_pays_per_call()
            await self.consumer_goes_prepaid(client)
            await self.settlement_lands(client)
            await self.provider_claims(client)
            await self.consumer_withdraws(client)

    # 1. the provider ---------------------------------------------------------------------------

    async def provider_lists(self, client: httpx.AsyncClient) -> None:
        self.step("1. A provider without ETH signs in with Ethereum and lists two keys")
        headers = await self.sign_in(client, self.provider)
        self.say(f"provider [cyan]{self.provider.address}[/] signed in (SIWE, EIP-4361): 0 ETH, 0 USDC")
        listings = [
            {
                "kind": "sandbox",
                "models": [SANDBOX_MODEL],
                "price_per_call": "0.02",
                "max_calls": 1_000,
                "max_output_tokens": 256,
                "rate_per_minute": 60,
            },
            {
                "kind": "openai-compatible",
                "base_url": self.upstream_url + "/v1",
                "api_key": LOCAL_API_KEY,
                "models": [LOCAL_MODEL],
                "price_per_call": "0.01",
                "price_input_per_mtok": "10",
                "price_output_per_mtok": "20",
                "max_calls": 500,
                "max_input_chars": 20_000,
                "max_output_tokens": 512,
                "rate_per_minute": 30,
            },
        ]
        for body in listings:
            created = _expect(await client.post("/v1/listings", json=body, headers=headers), 201)
            model = body["models"][0]  # type: ignore[index]
            self.summary.listings[model] = created["id"]
            extra = ""
            if "price_input_per_mtok" in body:
                tokens = f"{body['price_input_per_mtok']}/{body['price_output_per_mtok']}"
                extra = f" + {tokens} USDC per M tokens in/out"
            self.say(
                f"listed [bold]{model}[/] ({body['kind']}) as {created['id']}: "
                f"{body['price_per_call']} USDC per call{extra}, {body['rate_per_minute']}/min, "
                f"max {body['max_calls']} calls"
            )
        self.say(f"the openai-compatible key was checked against {self.upstream_url} and stored encrypted")

    # 2. browse and the playground --------------------------------------------------------------

    async def consumer_browses_and_plays(self, client: httpx.AsyncClient) -> None:
        self.step("2. A consumer without ETH browses the market and uses the free playground")
        self.twin.mint_usdc(self.consumer.address, parse_usdc(CONSUMER_USDC))
        self.summary.consumer_minted = parse_usdc(CONSUMER_USDC)
        self.say(f"consumer [cyan]{self.consumer.address}[/]: faucet {CONSUMER_USDC} USDC, 0 ETH")
        models = _expect(await client.get("/v1/models"), 200)
        self.say("GET /v1/models: " + ", ".join(sorted(m["id"] for m in models["data"])))
        listed = _expect(await client.get("/v1/listings"), 200)
        for item in listed["data"]:
            self.say(
                f"GET /v1/listings: {item['id']} {item.get('kind', '')} "
                f"{', '.join(item.get('models', []))} at {item.get('price_per_call', '?')} USDC/call"
            )
        for n in range(1, 10):
            reply = await client.post("/v1/chat/completions", json=_chat(SANDBOX_MODEL, f"free call {n}"))
            if reply.status_code == 402:
                self.summary.playground_refused_status = 402
                self.x402_price = int(_expect(reply, 402)["accepts"][0]["maxAmountRequired"])
                offer = (
                    _decode(reply.headers["payment-required"]) if "payment-required" in reply.headers else {}
                )
                accepts = (offer.get("accepts") or [{}])[0]
                self.say(
                    f"call {n}: [yellow]402 Payment Required[/], x402 offer: {accepts.get('scheme')} on "
                    f"{accepts.get('network')}, {format_usdc(int(accepts.get('amount', 0)))} USDC "
                    f"to the escrow {accepts.get('payTo', '')}"
                )
                break
            body = _expect(reply, 200)
            self.summary.playground_calls += 1
            self.say(f"call {n}: free, {body['choices'][0]['message']['content'][:60]!r}")
        else:
            raise DemoError("the playground never asked for a payment")

    # 3. x402 -----------------------------------------------------------------------------------

    async def consumer_pays_per_call(self) -> None:
        from x402 import x402Client
        from x402.http.clients.httpx import x402HttpxClient
        from x402.mechanisms.evm.exact.register import register_exact_evm_client
        from x402.mechanisms.evm.signers import EthAccountSigner

        self.step("3. Paying per call with the stock x402 client (no ETH: the relay settles)")
        stock = x402Client()
        register_exact_evm_client(stock, EthAccountSigner(self.consumer))
        async with x402HttpxClient(stock, base_url=self.relay_url, timeout=30) as http:
            for n in range(1, X402_CALLS + 1):
                reply = await http.post("/v1/chat/completions", json=_chat(SANDBOX_MODEL, f"paid call {n}"))
                body = _expect(reply, 200)
                response = _decode(reply.headers["payment-response"])
                amount = self.x402_price
                call_id = reply.headers["quotra-call-id"]
                assert response["call"] == call_id
                self.settlements.append(("x402", call_id, amount))
                self.summary.x402_paid.append(amount)
                self.say(
                    f"paid call {n}: 402 → signed TransferWithAuthorization → 200, "
                    f"{body['choices'][0]['message']['content'][:40]!r}, {call_id}"
                )

    # 4. prepaid --------------------------------------------------------------------------------

    async def consumer_goes_prepaid(self, client: httpx.AsyncClient) -> None:
        import openai

        self.step("4. Prepaid: a gasless deposit, one spend permission, an API key, the openai SDK")
        headers = await self.sign_in(client, self.consumer)
        amount = parse_usdc(DEPOSIT_USDC)
        auth = sign_authorization(
            self.consumer,
            self.deployment.usdc_domain,
            self.deployment.escrow,
            amount,
            primary="ReceiveWithAuthorization",
            valid_before=int(time.time()) + 3_600,
        )
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
        result = _expect(await client.post("/v1/account/deposits", json=body, headers=headers), 200, 202)
        self.summary.deposit = amount
        self.say(
            f"signed a ReceiveWithAuthorization of {DEPOSIT_USDC} USDC; POST /v1/account/deposits: "
            f"{result['status']} (submitted by the relayer {self.summary.gas_relayer[:10]}…)"
        )

        async def deposited() -> dict[str, Any] | None:
            account = _expect(await client.get("/v1/account", headers=headers), 200)
            return account if int(account["deposit_atomic"]) >= amount else None

        account = await _until(deposited, "the deposit to land")
        self.summary.deposit_status = "confirmed"
        if result.get("tx_hash"):
            self.summary.tx_hashes.append(("deposit_with_authorization", str(result["tx_hash"])))
        self.say(f"deposit confirmed: {account['deposit']} USDC in the escrow, still 0 ETH")

        typed = _expect(
            await client.get(
                "/v1/account/permission/typed-data",
                params={"allowance": ALLOWANCE_USDC, "days": 30},
                headers=headers,
            ),
            200,
        )
        signature = _wallet_sign_typed(self.consumer, typed["typed_data"])
        _expect(
            await client.post(
                "/v1/account/permission",
                json={"permission": typed["typed_data"]["message"], "signature": signature},
                headers=headers,
            ),
            200,
        )
        self.say(f"signed a SpendPermission: up to {ALLOWANCE_USDC} USDC for 30 days, spender = the operator")
        key = _expect(await client.post("/v1/account/keys", json={"name": "demo"}, headers=headers), 201)
        self.summary.api_key = key["key"]
        self.say(f"created API key {key['id']} ({key['key'][:16]}…, shown once)")

        sdk = openai.AsyncOpenAI(base_url=self.relay_url + "/v1", api_key=key["key"], max_retries=0)
        try:
            completion = await sdk.chat.completions.create(
                model=LOCAL_MODEL,
                messages=[{"role": "user", "content": "Hello through the SDK"}],
                max_tokens=32,
            )
            self.say(f"openai SDK: {(completion.choices[0].message.content or '')[:60]!r}")
            stream = await sdk.chat.completions.create(
                model=LOCAL_MODEL,
                messages=[{"role": "user", "content": "Stream me a reply"}],
                max_tokens=32,
                stream=True,
                stream_options={"include_usage": True},
            )
            text = ""
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            self.say(f"openai SDK, streamed: {text[:60]!r}")
        finally:
            await sdk.close()
        self.consumer_headers = headers

    # 5. settlement -----------------------------------------------------------------------------

    async def settlement_lands(self, client: httpx.AsyncClient) -> None:
        self.step("5. The settlement worker lands the batches on the escrow")
        txs: dict[str, tuple[str, int]] = {}  # tx -> (path, calls)
        for path, call_id, _amount in self.settlements:

            async def settled(cid: str = call_id) -> dict[str, Any] | None:
                # The payer, signed in, asks what became of its call.
                call = _expect(await client.get(f"/v1/calls/{cid}", headers=self.consumer_headers), 200)
                if call["state"] in ("failed", "voided", "refunded"):
                    raise DemoError(f"call {cid} ended {call['state']}")
                return call if call["state"] == "settled" else None

            call = await _until(settled, f"the settlement of {call_id}")
            tx = str(call["transaction"])
            calls = txs.get(tx, (path, 0))[1] + 1
            txs[tx] = ("x402 (settle_authorizations)", calls)
            self.say(f"{call_id}: settled in {tx[:18]}…")

        async def usage_settled() -> list[dict[str, Any]] | None:
            usage = _expect(await client.get("/v1/account/usage", headers=self.consumer_headers), 200)
            rows: list[dict[str, Any]] = [r for r in usage["data"] if r["gate"] == "prepaid"]
            if any(r["status"] in ("failed",) for r in rows):
                raise DemoError("a prepaid settlement failed")
            done = [r for r in rows if r["status"] == "settled"]
            return done if len(done) == PREPAID_CALLS and len(rows) == PREPAID_CALLS else None

        rows = await _until(usage_settled, "the prepaid calls to settle")
        for row in sorted(rows, key=lambda r: r["id"]):
            self.summary.prepaid_paid.append(int(row["price_atomic"]))
            tx = str(row["settlement_tx"])
            txs[tx] = ("prepaid (settle_charges)", txs.get(tx, ("", 0))[1] + 1)
            self.say(
                f"prepaid call {row['id']}: {row['prompt_tokens']}+{row['completion_tokens']} tokens, "
                f"{row['price']} USDC, settled in {tx[:18]}…"
            )
        for tx, (path, calls) in txs.items():
            receipt = self.w3.eth.get_transaction_receipt(tx)  # type: ignore[arg-type]
            self.summary.gas_per_call.append((path, int(receipt["gasUsed"]), calls))
            self.summary.tx_hashes.append((path, tx))

    # 6. the claim ------------------------------------------------------------------------------

    async def provider_claims(self, client: httpx.AsyncClient) -> None:
        self.step("6. The provider claims without ETH by ERC-7710 (MetaMask's Delegation Framework)")
        headers = await self.sign_in(client, self.provider)
        earned = int(self.escrow.functions.earnings(self.provider.address).call())
        self.summary.provider_earned = earned
        self.say(f"earnings in the escrow: {format_usdc(earned)} USDC")
        offer = _expect(
            await client.get(
                "/v1/provider/claims/erc7710/typed-data",
                params={"amount": format_usdc(earned)},
                headers=headers,
            ),
            200,
        )
        fee = int(offer["relayer"]["fee_atomic"])
        self.summary.relayer_fee = fee
        body: dict[str, Any] = {
            "claim": _signed_delegation(self.provider, offer["claim"]),
            "fee": _signed_delegation(self.provider, offer["fee"]),
        }
        self.say(
            f"signed two Delegations to the relayer: escrow.claim(≤ {format_usdc(earned)}, itself) once "
            f"within an hour, and USDC.transfer(relayer, ≤ {format_usdc(fee)})"
        )
        if offer["authorization"] is not None:
            upgrade = offer["authorization"]
            auth = Account.sign_authorization(upgrade, self.provider.key)
            body["authorization"] = {
                "chainId": auth.chain_id, "address": upgrade["address"], "nonce": auth.nonce,
                "yParity": auth.y_parity, "r": hex(auth.r), "s": hex(auth.s),
            }  # fmt: skip
            self.say(
                "signed an EIP-7702 authorization: its EOA becomes MetaMask's stateless DeleGator "
                f"{upgrade['address']}"
            )
        created = _expect(await client.post("/v1/provider/claims/erc7710", json=body, headers=headers), 202)
        self.say(f"POST /v1/provider/claims/erc7710: {created['id']} {created['status']}")

        async def final() -> dict[str, Any] | None:
            claim = _expect(await client.get(f"/v1/provider/claims/{created['id']}", headers=headers), 200)
            return claim if claim["status"] in ("confirmed", "failed") else None

        claim = await _until(final, f"claim {created['id']} to be confirmed")
        self.summary.claim_status = claim["status"]
        self.summary.claim_amount = int(claim["amount_atomic"])
        if claim["status"] != "confirmed":
            raise DemoError(f"claim {created['id']} failed: {claim.get('error') or claim}")
        self.summary.tx_hashes.append(("redeemDelegations (ERC-7710)", str(claim["tx_hash"])))
        self.summary.claim_gas = int(self.w3.eth.get_transaction_receipt(claim["tx_hash"])["gasUsed"])
        self.say(
            "the relayer redeemed them through the DelegationManager (one type-4 transaction, "
            f"gas {self.summary.claim_gas:,}): block {claim['block_number']}, "
            f"tx {str(claim['tx_hash'])[:18]}…"
        )

    # 7. the exit -------------------------------------------------------------------------------

    async def _withdrawal_step(self, client: httpx.AsyncClient, step: str, **params: str) -> dict[str, Any]:
        headers = self.consumer_headers
        offer = _expect(
            await client.get(
                "/v1/account/withdrawals/typed-data", params={"step": step, **params}, headers=headers
            ),
            200,
        )
        typed = offer["typed_data"]
        body = {
            "step": step,
            "message": typed["message"],
            "signature": _wallet_sign_typed(self.consumer, typed),
        }
        sent = _expect(await client.post("/v1/account/withdrawals", json=body, headers=headers), 200, 202)

        async def final() -> dict[str, Any] | None:
            seen = _expect(
                await client.get(f"/v1/account/withdrawals/{sent['task_id']}", headers=headers), 200
            )
            return seen if seen["status"] != "submitted" else None

        result = await _until(final, f"the signed {typed['primaryType']} to land")
        if result["status"] != "confirmed":
            raise DemoError(f"{typed['primaryType']} failed: {result.get('error') or result}")
        self.summary.tx_hashes.append((f"{typed['primaryType']} (signed)", str(result["tx_hash"])))
        return typed["message"]

    async def consumer_withdraws(self, client: httpx.AsyncClient) -> None:
        self.step("7. The consumer takes the rest of its deposit back without ETH (signed, relayed)")
        left = int(self.escrow.functions.deposits(self.consumer.address).call())
        await self._withdrawal_step(client, "request", amount=format_usdc(left))
        delay = self.deployment.withdrawal_delay
        self.say(f"signed a RequestWithdrawal of {format_usdc(left)} USDC; the relayer submitted it for free")
        self.twin.rpc("evm_increaseTime", hex(delay))
        self.twin.rpc("evm_mine")
        self.say(f"(the twin's clock moves past the {delay} s withdrawal delay)")
        message = await self._withdrawal_step(client, "withdraw")
        self.summary.withdrawn, self.summary.withdrawal_fee = left, int(message["relayer_fee"])
        self.summary.withdrawal_status = "confirmed"
        self.say(
            f"signed a Withdraw: {format_usdc(left - self.summary.withdrawal_fee)} USDC back in the wallet, "
            f"{format_usdc(self.summary.withdrawal_fee)} to the relayer, still 0 ETH"
        )


# ---- report and checks ----------------------------------------------------------------------------


def _report(console: Console, story: Marketplace, summary: MarketplaceSummary) -> None:
    console.rule("[bold]Who paid and who received")
    table = Table(show_header=True, header_style="bold")
    for column in ("party", "address", "ETH", "wallet USDC", "deposit", "earnings"):
        table.add_column(column, justify="left" if column in ("party", "address") else "right")
    f = story.escrow.functions
    parties = [
        ("Consumer", story.consumer.address),
        ("Provider", story.provider.address),
        ("Operator", summary.operator),
        ("Relayer", summary.gas_relayer),
    ]
    for name, address in parties:
        table.add_row(
            name,
            address[:10] + "…",
            f"{story.eth(address) / 10**18:.4f}",
            format_usdc(story.balance(address)),
            format_usdc(f.deposits(address).call()),
            format_usdc(f.earnings(address).call()),
        )
    table.add_row(
        "Escrow",
        story.escrow.address[:10] + "…",
        "",
        format_usdc(summary.escrow_balance),
        format_usdc(f.total_deposits().call()),
        format_usdc(f.total_earnings().call()),
    )
    console.print(table)
    console.print(
        f"  consumer paid {format_usdc(summary.total_paid)} USDC for {len(summary.x402_paid)} x402 and "
        f"{len(summary.prepaid_paid)} prepaid calls (+{summary.playground_calls} free); provider earned "
        f"{format_usdc(summary.provider_earned)}, received {format_usdc(summary.provider_wallet_after)} "
        f"after the relayer's {format_usdc(summary.relayer_fee)}; platform fee "
        f"{format_usdc(summary.platform_fees)} USDC ({summary.fee_bps} bps)",
        soft_wrap=True,
    )
    gas = Table(title="Gas per paid call", show_header=True, header_style="bold")
    for column in ("path", "gas / tx", "calls", "gas / call"):
        gas.add_column(column, justify="left" if column == "path" else "right")
    for path, used, calls in summary.gas_per_call:
        gas.add_row(path, f"{used:,}", str(calls), f"{used // max(calls, 1):,}")
    console.print(gas)
    console.print("  transactions:")
    for label, tx_hash in summary.tx_hashes:
        console.print(f"    {label:<30} {tx_hash}", soft_wrap=True)


def _check(console: Console, story: Marketplace, summary: MarketplaceSummary, env: dict[str, str]) -> None:
    console.rule("[bold]Checks")
    f = story.escrow.functions

    def ok(text: str) -> None:
        summary.checks.append(text)
        console.print(f"  [green]ok[/] {text}", soft_wrap=True)

    summary.escrow_balance = story.balance(story.escrow.address)
    summary.liabilities = int(f.liabilities().call())
    if summary.escrow_balance != summary.liabilities:
        raise DemoError(f"solvency: the escrow holds {summary.escrow_balance} but owes {summary.liabilities}")
    ok(f"usdc.balanceOf(escrow) == liabilities() == {format_usdc(summary.liabilities)} USDC")

    paid, bps = summary.total_paid, summary.fee_bps
    expected = paid * (MAX_BPS - bps) // MAX_BPS
    if summary.provider_earned != expected or paid * (MAX_BPS - bps) % MAX_BPS:
        raise DemoError(f"split: the provider was credited {summary.provider_earned}, expected {expected}")
    ok(f"provider earned exactly {format_usdc(expected)} = {(MAX_BPS - bps) // 100}% of {format_usdc(paid)}")
    if summary.platform_fees != paid - expected:
        raise DemoError(f"platform fees {summary.platform_fees}, expected {paid - expected}")
    ok(f"platform fees == {format_usdc(paid - expected)} USDC")

    if (
        summary.provider_wallet_after != summary.claim_amount - summary.relayer_fee
        or summary.claim_amount != expected
    ):
        raise DemoError(
            f"claim: the provider's wallet holds {summary.provider_wallet_after}, "
            f"expected {expected} - {summary.relayer_fee}"
        )
    if summary.provider_earnings_after != 0:
        raise DemoError(f"the provider still has {summary.provider_earnings_after} unclaimed")
    ok(
        f"ERC-7710 claim confirmed: provider received {format_usdc(summary.provider_wallet_after)}, "
        "relayer its fee, in one redemption"
    )

    spent_wallet = summary.consumer_minted - summary.consumer_wallet_after
    returned = summary.withdrawn - summary.withdrawal_fee
    if spent_wallet != sum(summary.x402_paid) + summary.deposit - returned:
        raise DemoError(f"the consumer's wallet lost {spent_wallet}, expected x402 + deposit - withdrawn")
    if summary.withdrawn != summary.deposit - sum(summary.prepaid_paid) or summary.consumer_deposit_after:
        raise DemoError(f"the consumer withdrew {summary.withdrawn}, expected deposit - prepaid, leaving 0")
    ok(
        "consumer's wallet and deposit moved by exactly what its calls cost; it withdrew the rest "
        f"({format_usdc(returned)} after the relayer's {format_usdc(summary.withdrawal_fee)}) without ETH"
    )

    if any(summary.eth_balances.values()):
        raise DemoError(f"a wallet was given ETH: {summary.eth_balances}")
    ok("consumer and provider never held ETH")

    done = subprocess.run(  # noqa: S603 - fixed argv
        [*quotra_argv(), "reconcile"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    summary.reconcile_exit = done.returncode
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        raise DemoError(f"`quotra reconcile` exited {done.returncode}: {lines[-1] if lines else ''}")
    ok("`quotra reconcile`: the settled calls agree with the escrow's credits (0 discrepancies)")


# ---- run ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _deployments_dir(directory: Path) -> Iterator[None]:
    old = os.environ.get(DEPLOYMENTS_DIR_ENV)
    os.environ[DEPLOYMENTS_DIR_ENV] = str(directory)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(DEPLOYMENTS_DIR_ENV, None)
        else:
            os.environ[DEPLOYMENTS_DIR_ENV] = old


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so `kill` of the demo stops what it started, too."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTRA_")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run(console: Console, keep: bool = False) -> MarketplaceSummary:
    """Tell the marketplace story with real processes; raises `DemoError` (one line) on a failed
    step. Returns the summary; everything started is stopped on return, error or Ctrl-C, unless
    `keep` (then it prints the URLs and keys and waits for Ctrl-C first)."""
    from quotra_dev.localmodel import create_app as localmodel_app
    from quotra_dev.localmodel import run_in_thread

    started = time.monotonic()
    summary = MarketplaceSummary()
    console.rule("[bold magenta]Quotra's marketplace on a local Base Sepolia twin")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_interrupts())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quotra-demo-")))
        with console.status("starting anvil (chain id 84532, MockUSDC at the Base Sepolia USDC address)…"):
            chain_ = stack.enter_context(twin.start())
        dev = [account_from_key(a.private_key) for a in chain_.accounts]
        owner, operator, gas = dev[0], dev[1], dev[2]
        summary.rpc_url, summary.operator, summary.gas_relayer = chain_.rpc_url, operator.address, gas.address
        console.print(f"  twin at {chain_.rpc_url}; owner {owner.address}, operator {operator.address}")
        with (
            console.status(f"ape run deploy escrow --network {NETWORK} --account {DEPLOYER_ALIAS} …"),
            _deployments_dir(tmp / "deployments"),
        ):
            deployment = deploy_with_ape(chain_, operator.address)
        deployment_file = tmp / "deployments" / "base-sepolia-twin.json"
        if not deployment_file.is_file():
            deployment_file = deployment.save(tmp / "base-sepolia-twin.json")
        summary.escrow, summary.usdc, summary.fee_bps = deployment.escrow, deployment.usdc, deployment.fee_bps
        summary.deployments_dir = str(deployment_file.parent)
        console.print(
            f"  escrow {deployment.escrow} deployed by `ape run deploy escrow` (block {deployment.block})"
        )

        (upstream_url,) = stack.enter_context(
            run_in_thread(localmodel_app(api_key=LOCAL_API_KEY, models=[LOCAL_MODEL], chunk_delay=0.0))
        )
        summary.upstream_url = upstream_url
        console.print(f"  local OpenAI-compatible model server at {upstream_url}")

        relayer_port, relay_port = twin.free_port(), twin.free_port()
        relayer_url, relay_url = f"http://127.0.0.1:{relayer_port}", f"http://127.0.0.1:{relay_port}"
        base_env = _clean_env()
        relayer_env = {
            **base_env,
            "QUOTRA_RELAYER_KEY": "0x" + bytes(gas.key).hex(),  # anvil's public dev account 2
            "QUOTRA_CHAIN_ID": str(deployment.chain_id),
        }
        argv = [
            *quotra_argv(), "relayer", "--port", str(relayer_port),
            "--rpc-url", chain_.rpc_url, "--deployment", str(deployment_file),
        ]  # fmt: skip
        with console.status(f"quotra relayer --port {relayer_port} …"):
            relayer = Process("quotra relayer", argv, relayer_env, tmp / "relayer.log")
            stack.callback(relayer.stop)
            relayer.wait_ready(relayer_url + "/.well-known/jwks.json")
        summary.relayer_url = relayer_url
        console.print(f"  gas relayer at {relayer_url} (gas key {gas.address})")

        relay_env = {
            **base_env,
            "QUOTRA_ENV": "dev",
            "QUOTRA_DATA_DIR": str(tmp / "data"),
            "QUOTRA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'relay.db'}",
            "QUOTRA_MASTER_KEY": secrets.token_hex(32),
            "QUOTRA_PUBLIC_URL": relay_url,
            "QUOTRA_LOG_JSON": "false",
            "QUOTRA_LOG_LEVEL": "WARNING",
            "QUOTRA_CHAIN_RPC_URL": chain_.rpc_url,
            "QUOTRA_WALLET_RPC_URL": chain_.rpc_url,  # what the pages offer wallets to add
            "QUOTRA_DEPLOYMENT_FILE": str(deployment_file),
            "QUOTRA_OPERATOR_KEY": "0x" + bytes(operator.key).hex(),  # anvil's public dev account 1
            "QUOTRA_RELAYER": "oneshot",
            "QUOTRA_RELAYER_URL": relayer_url + "/relayers",
            "QUOTRA_UPSTREAM_ALLOW_PRIVATE": "true",
            "QUOTRA_LISTING_CACHE_TTL_SECONDS": "0",
            "QUOTRA_SETTLEMENT_MAX_AGE_SECONDS": "0.5",
            "QUOTRA_SETTLEMENT_POLL_SECONDS": "0.1",
            "QUOTRA_INDEXER_POLL_SECONDS": "0.5",
            "QUOTRA_CLAIMS_POLL_SECONDS": "0.2",
            "QUOTRA_CLAIMS_STALE_SECONDS": "1",
            "QUOTRA_PREPAID_REFRESH_SECONDS": "0",
        }
        with console.status(f"quotra serve --port {relay_port} …"):
            relay = Process(
                "quotra serve",
                [*quotra_argv(), "serve", "--port", str(relay_port)],
                relay_env,
                tmp / "relay.log",
            )
            stack.callback(relay.stop)
            relay.wait_ready(relay_url + "/healthz")
        summary.relay_url = relay_url
        console.print(f"  relay at {relay_url} (SQLite in {tmp}, relayer = oneshot → {relayer_url})")

        story = Marketplace(console, chain_, deployment, relay_url, relayer_url, upstream_url, summary)
        summary.provider, summary.consumer = story.provider.address, story.consumer.address
        summary.provider_key = "0x" + bytes(story.provider.key).hex()
        summary.consumer_key = "0x" + bytes(story.consumer.key).hex()
        try:
            asyncio.run(story.run())
        except DemoError as exc:
            for process in (relay, relayer):
                if process.popen.poll() is not None:
                    raise DemoError(f"{exc} (`{process.name}` exited: {process.last_line()})") from exc
            raise

        f = story.escrow.functions
        summary.provider_wallet_after = story.balance(story.provider.address)
        summary.provider_earnings_after = int(f.earnings(story.provider.address).call())
        summary.consumer_wallet_after = story.balance(story.consumer.address)
        summary.consumer_deposit_after = int(f.deposits(story.consumer.address).call())
        summary.platform_fees = int(f.platform_fees().call())
        summary.escrow_balance = story.balance(story.escrow.address)
        summary.eth_balances = {
            "consumer": story.eth(story.consumer.address),
            "provider": story.eth(story.provider.address),
        }
        _report(console, story, summary)
        _check(console, story, summary, relay_env)
        summary.seconds = time.monotonic() - started
        if keep:
            _keep_running(console, summary, story)
    summary.seconds = summary.seconds or time.monotonic() - started
    console.rule(f"[bold green]done in {summary.seconds:.1f} s; every process is stopped")
    return summary


KEEP_CONSUMER_USDC: Final = "100"


def _keep_running(console: Console, summary: MarketplaceSummary, story: Marketplace) -> None:
    """What a person needs to go on by hand: every URL, address and (throw-away) key, the
    environment that points the ape scripts at this chain and its deployment, and the market in a
    browser with a wallet such as MetaMask (the consumer topped up; the marketplace URL last)."""
    story.twin.mint_usdc(story.consumer.address, parse_usdc(KEEP_CONSUMER_USDC))
    lines = [
        f"  relay          {summary.relay_url}   (OpenAI base URL: {summary.relay_url}/v1)",
        f"  gas relayer    {summary.relayer_url}",
        f"  model server   {summary.upstream_url}   models: {SANDBOX_MODEL}, {LOCAL_MODEL}",
        f"  chain (anvil)  {summary.rpc_url}   chain id 84532",
        f"  escrow         {summary.escrow}   USDC {summary.usdc}",
        f"  deployment     {summary.deployments_dir}/base-sepolia-twin.json",
        f"  consumer       {summary.consumer}   API key {summary.api_key}",
        f"  consumer key   {summary.consumer_key}   (a throw-away twin key: import it into a wallet; "
        f"+{KEEP_CONSUMER_USDC} USDC; no ETH: every step is signed)",
        f"  provider       {summary.provider}",
        f"  provider key   {summary.provider_key}   (throw-away; it owns the two listings)",
        f"  operator       {summary.operator} (anvil dev account 1)",
        f"  relayer gas    {summary.gas_relayer} (anvil dev account 2)",
        "",
        "  try the API:",
        f"    curl {summary.relay_url}/v1/chat/completions -H 'Authorization: Bearer {summary.api_key}' "
        f'-H \'Content-Type: application/json\' -d \'{{"model":"{LOCAL_MODEL}","messages":'
        '[{"role":"user","content":"Hi"}]}\'',
        "  act on this chain with the ape scripts (from the project root, in another terminal):",
        f"    export QUOTRA_TWIN_RPC_URL={summary.rpc_url} QUOTRA_DEPLOYMENTS_DIR={summary.deployments_dir}",
        f"    .venv/bin/ape run faucet {summary.consumer} --amount 10 --network base:sepolia-twin:node",
        "",
        "  in a browser, with MetaMask (README: The marketplace in a browser):",
        f"    1. add the twin as a network: RPC URL {summary.rpc_url}, chain ID 84532, currency ETH "
        "(or press “Switch to Base Sepolia” on the page)",
        "    2. import the consumer's and the provider's keys above (for this twin only)",
        "    3. open the marketplace URL below, exactly as printed (sign-in messages name that host)",
    ]
    console.rule("[bold]Left running (Ctrl-C stops everything)")
    for line in lines:
        # Never wrapped: addresses, keys and commands are copied whole, terminal or not.
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    console.print(f"[bold green]Marketplace: {summary.relay_url}/[/]", soft_wrap=True, highlight=False)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("[yellow]stopping…[/]")


__all__ = ["MarketplaceSummary", "run"]
