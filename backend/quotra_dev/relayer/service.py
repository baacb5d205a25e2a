"""The local relayer's logic: quotes, checks, submission to the chain and signed webhooks.

Tasks live in memory (a development relayer: a restart forgets them, and the relay's poller then
falls back on the chain). Submission reuses `DirectRelayer` with the relayer's own gas key: nonces,
gas estimation, EIP-1559 fees, replacement of stuck transactions, receipts.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import httpx
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from nacl.exceptions import BadSignatureError
from quotra.chain import delegation as dlg
from quotra.chain import oneshot
from quotra.chain.client import ZERO_ADDRESS, DelegationArgs, abi
from quotra.chain.delegation import SetCodeAuthorization
from quotra.chain.deployment import DelegationFramework
from quotra.chain.relayer import ChainCall, DirectRelayer, RelayerError, Submission, TxState, revert_reason
from quotra.webhooks import (
    TYPE_CONFIRMED,
    TYPE_FAILED,
    TYPE_SUBMITTED,
    Ed25519Signer,
    b64url_decode,
    b64url_encode,
    canonical_json,
)
from web3 import AsyncWeb3
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError

log = logging.getLogger("quotra.relayer.service")

# Escrow calls relayed without a fee: they move no USDC the relayer could be paid from (a fee out
# of a deposit before the withdrawal delay would let a consumer skip the delay).
DEFAULT_SPONSORED: Final = frozenset(
    {
        "revoke_with_signature",
        "deposit_with_authorization",
        "request_withdrawal_with_signature",
        "cancel_withdrawal_with_signature",
    }
)
DELEGATION_FIELDS: Final = (
    "provider",
    "delegate",
    "payee",
    "max_amount",
    "relayer_fee",
    "valid_until",
    "salt",
)


class RpcError(Exception):
    """A JSON-RPC error answer."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def invalid_params(message: str) -> RpcError:
    return RpcError(-32602, "Invalid params", message)


@dataclass
class RelayerConfig:
    """What the local relayer needs. `gas_account` is a dev key given by env, never a file."""

    rpc_url: str
    gas_account: LocalAccount
    chain_id: int
    usdc: str
    targets: tuple[str, ...]
    signer: Ed25519Signer
    min_fee: int = 10_000  # 0.01 USDC, 1Shot's floor
    sponsored: frozenset[str] = DEFAULT_SPONSORED
    quote_ttl: int = 30
    eth_usd: float = 3_000.0
    webhook_format: Literal["oneshot", "standard"] = "oneshot"
    # MetaMask's Delegation Framework (from the deployment record): ERC-7710 redemptions go to the
    # DelegationManager; EIP-7702 upgrades are sponsored to the stateless DeleGator only.
    framework: DelegationFramework | None = None
    webhook_attempts: int = 8
    webhook_backoff: float = 0.5
    webhook_max_delay: float = 30.0
    webhook_timeout: float = 5.0
    poll_interval: float = 0.2
    receipt_timeout: float = 300.0
    replace_after: float = 30.0


@dataclass
class Task:
    id: str
    chain_id: int
    to: str
    data: bytes
    function: str
    created_at: int
    memo: str | None
    destination_url: str | None
    authorizations: tuple[SetCodeAuthorization, ...] = ()
    status: int = TxState.PENDING
    hash: str | None = None
    receipt: dict[str, Any] | None = None
    message: str | None = None
    revert_data: str | None = None

    def status_object(self, *, logs: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "chainId": str(self.chain_id),
            "createdAt": self.created_at,
            "status": int(self.status),
        }
        if self.memo is not None:
            out["memo"] = self.memo
        if self.hash is not None:
            out["hash"] = self.hash
        if self.receipt is not None:
            receipt = dict(self.receipt)
            if not logs:
                receipt.pop("logs", None)
            out["receipt"] = receipt
        if self.message is not None:
            out["message"] = self.message
        if self.status == TxState.REVERTED:
            out["data"] = self.revert_data or "0x"
        return out


@dataclass
class Delivery:
    url: str
    type: int
    task_id: str
    attempt: int
    status_code: int | None


@dataclass
class RelayerCore:
    config: RelayerConfig
    w3: AsyncWeb3
    http: httpx.AsyncClient
    clock: Callable[[], float] = time.time
    tasks: dict[str, Task] = field(default_factory=dict)
    deliveries: list[Delivery] = field(default_factory=list)
    send_requests: int = 0
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.address = to_checksum_address(self.config.gas_account.address)
        self.direct = DirectRelayer(
            self.w3,
            self.config.gas_account,
            chain_id=self.config.chain_id,
            replace_after=self.config.replace_after,
        )
        self.escrow_abi = self.w3.eth.contract(abi=abi("QuotraEscrow"))
        self.targets: set[str] = {to_checksum_address(t) for t in self.config.targets}

    # ---- lifecycle -----------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until every submission and webhook delivery under way has finished (tests)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # ---- JSON-RPC methods ----------------------------------------------------------------------

    async def dispatch(self, method: str, params: Any) -> Any:
        handlers = {
            "relayer_getCapabilities": self.get_capabilities,
            "relayer_getFeeData": self.get_fee_data,
            "relayer_send7710Transaction": self.send_7710,
            "relayer_getStatus": self.get_status,
        }
        handler = handlers.get(method)
        if handler is None:
            raise RpcError(-32601, "Method not found", method)
        return await handler(params)

    def _capability(self) -> dict[str, Any]:
        return {
            "feeCollector": self.address,
            "targetAddress": self.address,
            "tokens": [
                {
                    "address": to_checksum_address(self.config.usdc),
                    "symbol": "USDC",
                    "name": "USDC",
                    "decimals": 6,
                }
            ],
        }

    async def get_capabilities(self, params: Any) -> dict[str, Any]:
        if params is None:
            params = []
        if not isinstance(params, list) or not all(isinstance(c, str | int) for c in params):
            raise invalid_params("params must be a list of chain ids")
        wanted = {str(c) for c in params} or {str(self.config.chain_id)}
        return {str(self.config.chain_id): self._capability()} if str(self.config.chain_id) in wanted else {}

    def _check_chain(self, chain_id: Any) -> None:
        if str(chain_id) != str(self.config.chain_id):
            raise RpcError(4206, "Unsupported Chain", f"this relayer serves chain {self.config.chain_id}")

    def _check_token(self, token: Any) -> None:
        if not isinstance(token, str) or token.lower() != self.config.usdc.lower():
            raise RpcError(4202, "Unsupported Payment Token", token)

    async def get_fee_data(self, params: Any) -> dict[str, Any]:
        if not isinstance(params, dict):
            raise invalid_params("params must be an object {chainId, token}")
        self._check_chain(params.get("chainId"))
        self._check_token(params.get("token"))
        gas_price = int(await self.w3.eth.gas_price)
        expiry = int(self.clock()) + self.config.quote_ttl
        quote = {
            "c": str(self.config.chain_id),
            "t": self.config.usdc.lower(),
            "f": str(self.config.min_fee),
            "e": expiry,
        }
        return {
            "chainId": str(self.config.chain_id),
            "token": {
                "address": to_checksum_address(self.config.usdc),
                "decimals": 6,
                "symbol": "USDC",
                "name": "USDC",
            },
            "rate": self.config.eth_usd * 10**6 / 10**18,
            "minFee": str(self.config.min_fee),
            "expiry": expiry,
            "gasPrice": hex(gas_price),
            "feeCollector": self.address,
            "targetAddress": self.address,
            "context": self._sign_quote(quote),
        }

    def _sign_quote(self, quote: dict[str, Any]) -> str:
        payload = canonical_json(quote)
        signature = self.config.signer.key.sign(payload).signature
        return f"{b64url_encode(payload)}.{b64url_encode(signature)}"

    def _read_quote(self, context: Any) -> dict[str, Any]:
        if not isinstance(context, str) or context.count(".") != 1:
            raise invalid_params("context is not a quote of this relayer")
        try:
            payload_text, signature_text = context.split(".")
            payload = b64url_decode(payload_text)
            self.config.signer.key.verify_key.verify(payload, b64url_decode(signature_text))
            quote: dict[str, Any] = json.loads(payload)
        except (binascii.Error, ValueError, BadSignatureError) as exc:
            raise invalid_params("context is not a quote of this relayer") from exc
        if int(quote["e"]) < self.clock():
            raise RpcError(4204, "Quote Expired", "fetch relayer_getFeeData again")
        return quote

    async def get_status(self, params: Any) -> dict[str, Any]:
        if isinstance(params, list) and params:
            params = params[0] if isinstance(params[0], dict) else {"id": params[0]}
        if not isinstance(params, dict) or not isinstance(params.get("id"), str):
            raise invalid_params("params must be an object {id, logs}")
        task = self.tasks.get(params["id"].lower())
        if task is None:
            raise RpcError(4208, "Unknown Transaction ID", params["id"])
        return task.status_object(logs=bool(params.get("logs")))

    async def send_7710(self, params: Any) -> str:
        self.send_requests += 1
        if not isinstance(params, dict):
            raise invalid_params("params must be an object")
        self._check_chain(params.get("chainId"))
        memo = params.get("memo")
        if memo is not None and (not isinstance(memo, str) or len(memo) > oneshot.MAX_MEMO):
            raise invalid_params(f"memo must be a string of at most {oneshot.MAX_MEMO} characters")
        destination = params.get("destinationUrl")
        if destination is not None:
            parts = urlsplit(destination) if isinstance(destination, str) else None
            if (
                parts is None
                or len(destination) > oneshot.MAX_DESTINATION_URL
                or parts.scheme not in ("http", "https")
                or not parts.netloc
            ):
                limit = oneshot.MAX_DESTINATION_URL
                raise invalid_params(f"destinationUrl must be an http(s) URL of {limit} characters at most")
        task_id = params.get("taskId")
        if task_id is not None:
            if not isinstance(task_id, str) or not _is_hex(task_id, 32):
                raise RpcError(4213, "Invalid Task ID", "taskId must be 0x + 64 hex digits")
            task_id = task_id.lower()
            if task_id in self.tasks:
                raise RpcError(4214, "Duplicate Task ID", task_id)
        min_fee = self.config.min_fee
        if params.get("context") is not None:
            quote = self._read_quote(params["context"])
            self._check_chain(quote["c"])
            min_fee = int(quote["f"])
        transactions = params.get("transactions")
        authorizations = self._authorizations(params.get("authorizationList"))
        if isinstance(transactions, list) and self._redeems(transactions):
            to, data = self._redemption(transactions, min_fee)
            function = "redeemDelegations"
        else:
            if authorizations:
                raise invalid_params("authorizationList comes with ERC-7710 redemptions only")
            to, data = self._single_execution(transactions)
            function = self._check_payment(to, data, min_fee)
        await self._simulate(to, data, authorizations)
        if task_id is None:
            task_id = oneshot.new_task_id()
        elif task_id in self.tasks:  # raced with an identical resend while simulating
            raise RpcError(4214, "Duplicate Task ID", task_id)
        task = Task(
            task_id,
            self.config.chain_id,
            to,
            data,
            function,
            int(self.clock()),
            memo,
            destination,
            authorizations,
        )
        self.tasks[task_id] = task
        self._spawn(self._run(task))
        log.info("relayer.task_accepted", extra={"task": task_id, "function": function})
        return task_id

    def _single_execution(self, transactions: Any) -> tuple[str, bytes]:
        if not isinstance(transactions, list) or not transactions:
            raise invalid_params("transactions must be a non-empty list")
        if len(transactions) != 1:
            raise RpcError(4207, "Transaction Too Large", "this relayer takes one transaction per task")
        tx = transactions[0]
        if not isinstance(tx, dict) or not isinstance(tx.get("executions"), list):
            raise invalid_params("a transaction is {permissionContext, executions}")
        if len(tx["executions"]) != 1:
            raise RpcError(4207, "Transaction Too Large", "this relayer takes one execution per task")
        execution = self._execution(tx["executions"][0], self.targets)
        return execution.target, execution.data

    @staticmethod
    def _redeems(transactions: list[Any]) -> bool:
        """Whether the transactions are ERC-7710 redemptions (a non-empty permission context)."""
        return any(
            isinstance(tx, dict) and isinstance(tx.get("permissionContext"), str) and tx["permissionContext"]
            for tx in transactions
        )

    def _redemption(self, transactions: list[Any], min_fee: int) -> tuple[str, bytes]:
        """`redeemDelegations` of the transactions, in one call to the DelegationManager. The
        executions may call the escrow, USDC and the DelegationManager (a gasless
        `disableDelegation`, sponsored); anything else must pay this relayer at least `min_fee`
        in USDC, as a `transfer` to its fee collector among the executions."""
        framework = self.config.framework
        if framework is None:
            raise RpcError(4209, "Unsupported Capability", "no Delegation Framework on this chain")
        manager = framework.delegation_manager
        allowed = {*self.targets, to_checksum_address(self.config.usdc), manager}
        entries: list[dlg.Redemption] = []
        for tx in transactions:
            if not isinstance(tx, dict) or not isinstance(tx.get("executions"), list) or not tx["executions"]:
                raise invalid_params("a transaction is {permissionContext, executions}")
            context = tx.get("permissionContext")
            if not isinstance(context, str) or not _is_hex_data(context):
                raise invalid_params("permissionContext must be 0x-hex abi.encode(Delegation[])")
            raw = bytes.fromhex(context[2:])
            try:
                dlg.decode_context(raw)
            except dlg.DelegationError as exc:
                raise invalid_params(str(exc)) from None
            executions = tuple(self._execution(e, allowed) for e in tx["executions"])
            entries.append(dlg.Redemption(raw, executions))
        calls = [e for entry in entries for e in entry.executions]
        fee = sum(self._fee_paid(e) for e in calls)
        sponsored = all(e.target == manager and e.data[:4] == dlg.DISABLE_DELEGATION for e in calls)
        if not sponsored and fee < min_fee:
            raise RpcError(
                4200,
                "Insufficient Payment",
                f"the executions pay this relayer {fee} in USDC, below the quoted minFee {min_fee}",
            )
        return manager, dlg.encode_redeem(entries)

    def _execution(self, execution: Any, allowed: set[str]) -> dlg.Execution:
        if not isinstance(execution, dict):
            raise invalid_params("an execution is {target, value, data}")
        target, value, data = execution.get("target"), execution.get("value", "0"), execution.get("data")
        if not isinstance(target, str) or not _is_hex(target, 20):
            raise invalid_params("execution target must be an address")
        if str(value) not in ("0", "0x0", "0x"):
            raise RpcError(4209, "Unsupported Capability", "this relayer sends no value")
        if not isinstance(data, str) or not _is_hex_data(data) or len(data) < 10:
            raise invalid_params("execution data must be 0x-hex calldata")
        target = to_checksum_address(target)
        if target not in allowed:
            raise RpcError(4209, "Unsupported Capability", f"this relayer does not relay calls to {target}")
        return dlg.Execution(target, bytes.fromhex(data[2:]))

    def _fee_paid(self, execution: dlg.Execution) -> int:
        """What an execution pays this relayer: a USDC `transfer` to its fee collector."""
        data = execution.data
        if execution.target != to_checksum_address(self.config.usdc) or data[:4] != dlg.ERC20_TRANSFER:
            return 0
        if len(data) != 68 or to_checksum_address(data[16:36]) != self.address:
            return 0
        return int.from_bytes(data[36:68], "big")

    def _authorizations(self, value: Any) -> tuple[SetCodeAuthorization, ...]:
        """EIP-7702 authorizations to sponsor: for this chain, to MetaMask's stateless DeleGator."""
        if value is None:
            return ()
        if not isinstance(value, list) or len(value) > 4:
            raise invalid_params("authorizationList must be a list of at most 4 authorizations")
        framework = self.config.framework
        out = []
        for raw in value:
            try:
                auth = SetCodeAuthorization.from_json(raw)
            except dlg.DelegationError as exc:
                raise invalid_params(str(exc)) from None
            if auth.chain_id != self.config.chain_id:
                raise RpcError(4206, "Unsupported Chain", "an authorization is for another chain")
            if framework is None or auth.address != framework.stateless_delegator:
                raise RpcError(
                    4209,
                    "Unsupported Capability",
                    "only upgrades to MetaMask's EIP7702StatelessDeleGator are sponsored",
                )
            out.append(auth)
        return tuple(out)

    def _check_payment(self, to: str, data: bytes, min_fee: int) -> str:
        """The function called; refuses calls that do not pay the relayer unless they are sponsored."""
        try:
            fn, args = self.escrow_abi.decode_function_input(HexBytes(data))
        except (ValueError, KeyError) as exc:
            raise RpcError(4209, "Unsupported Capability", "not an escrow call") from exc
        name = fn.fn_name
        if name == "claim_with_delegation":
            raw = args["delegation"]
            delegation = (
                dict(raw) if isinstance(raw, dict) else dict(zip(DELEGATION_FIELDS, raw, strict=True))
            )
            delegate = to_checksum_address(delegation["delegate"])
            if delegate not in (ZERO_ADDRESS, self.address):
                raise RpcError(
                    4209, "Unsupported Capability", f"the delegation names another delegate ({delegate})"
                )
            # The escrow pays the signed fee pro rata of the amount claimed.
            signed = DelegationArgs(**{k: delegation[k] for k in DELEGATION_FIELDS})
            fee = signed.relayer_fee_for(int(args["amount"])) if signed.max_amount else 0
            if fee < min_fee:
                raise RpcError(
                    4200,
                    "Insufficient Payment",
                    f"this claim pays the relayer {fee}, below the quoted minFee {min_fee}",
                )
            return name
        if name == "withdraw_with_signature":
            if int(args["relayer_fee"]) < min_fee:
                raise RpcError(
                    4200,
                    "Insufficient Payment",
                    f"this withdrawal pays the relayer {args['relayer_fee']}, below the minFee {min_fee}",
                )
            return name
        if name in self.config.sponsored:
            return name
        raise RpcError(4209, "Unsupported Capability", f"{name} is not relayed (it pays no fee)")

    async def _simulate(
        self, to: str, data: bytes, authorizations: tuple[SetCodeAuthorization, ...] = ()
    ) -> None:
        tx: dict[str, Any] = {"from": self.address, "to": to, "data": HexBytes(data)}
        if authorizations:
            tx["authorizationList"] = [a.as_tx() for a in authorizations]
        try:
            await self.w3.eth.estimate_gas(tx)  # type: ignore[arg-type]
        except (ContractLogicError, Web3RPCError, ValueError) as exc:
            raise RpcError(4211, "Simulation Failed", revert_reason(exc)) from exc

    # ---- submission ----------------------------------------------------------------------------

    async def _run(self, task: Task) -> None:
        try:
            await self._submit(task)
        except Exception as exc:  # a task must end in a final state, whatever happened
            log.exception("relayer.task_crashed", extra={"task": task.id})
            if task.status < TxState.CONFIRMED:
                task.status, task.message = TxState.REJECTED, f"relayer error: {type(exc).__name__}"
                self._emit(task, TYPE_FAILED)

    async def _submit(self, task: Task) -> None:
        call = ChainCall(task.to, task.data, label=task.function, authorizations=task.authorizations)
        sub: Submission | None = None
        for attempt in range(3):
            try:
                sub = await self.direct.send(call, memo=task.memo)
                break
            except RelayerError as exc:
                log.warning("relayer.broadcast_failed", extra={"task": task.id, "error": str(exc)[:200]})
                await asyncio.sleep(0.5 * 2**attempt)
        if sub is None or sub.state is TxState.REJECTED:
            task.status = TxState.REJECTED
            task.message = (sub.error if sub else None) or "could not broadcast the transaction"
            self._emit(task, TYPE_FAILED)
            return
        task.status, task.hash = TxState.SUBMITTED, sub.tx_hash
        self._emit(task, TYPE_SUBMITTED)
        deadline = time.monotonic() + self.config.receipt_timeout
        while not sub.state.final:
            if time.monotonic() > deadline:
                task.status, task.message = TxState.REJECTED, "no receipt in time"
                self._emit(task, TYPE_FAILED)
                return
            await asyncio.sleep(self.config.poll_interval)
            sub = await self.direct.status(sub.id)
            task.hash = sub.tx_hash or task.hash
        task.receipt = await self._receipt(sub.tx_hash or task.hash or "")
        if sub.state is TxState.CONFIRMED:
            task.status = TxState.CONFIRMED
            self._emit(task, TYPE_CONFIRMED)
        else:
            task.status, task.message = TxState.REVERTED, "execution reverted"
            self._emit(task, TYPE_FAILED)

    async def _receipt(self, tx_hash: str) -> dict[str, Any] | None:
        try:
            receipt = await self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except (TransactionNotFound, ValueError):
            return None
        return {
            "blockHash": "0x" + bytes(receipt["blockHash"]).hex(),
            "blockNumber": int(receipt["blockNumber"]),
            "gasUsed": str(int(receipt["gasUsed"])),
            "transactionHash": "0x" + bytes(receipt["transactionHash"]).hex(),
            "logs": [
                {
                    "address": log_entry["address"],
                    "topics": ["0x" + bytes(t).hex() for t in log_entry["topics"]],
                    "data": "0x" + bytes(log_entry["data"]).hex(),
                }
                for log_entry in receipt["logs"]
            ],
        }

    # ---- webhooks ------------------------------------------------------------------------------

    def _emit(self, task: Task, event_type: int) -> None:
        if task.destination_url:
            self._spawn(self._deliver(task.destination_url, task.id, event_type, task.status_object()))

    def webhook_request(
        self, task_id: str, event_type: int, data: dict[str, Any]
    ) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one delivery attempt (signed afresh, with the current time)."""
        timestamp = int(self.clock())
        envelope = {"apiVersion": 0, "type": event_type, "data": data, "timestamp": timestamp}
        headers = {"content-type": "application/json", "user-agent": "quotra-relayer"}
        if self.config.webhook_format == "standard":
            body = canonical_json(envelope)
            headers.update(self.config.signer.sign_standard(f"{task_id}:{event_type}", timestamp, body))
            return body, headers
        return canonical_json(self.config.signer.sign_oneshot(envelope)), headers

    async def _deliver(self, url: str, task_id: str, event_type: int, data: dict[str, Any]) -> None:
        for attempt in range(1, self.config.webhook_attempts + 1):
            body, headers = self.webhook_request(task_id, event_type, data)
            status: int | None = None
            try:
                reply = await self.http.post(
                    url, content=body, headers=headers, timeout=self.config.webhook_timeout
                )
                status = reply.status_code
            except httpx.HTTPError as exc:
                log.info("relayer.webhook_error", extra={"task": task_id, "error": type(exc).__name__})
            self.deliveries.append(Delivery(url, event_type, task_id, attempt, status))
            if status is not None and 200 <= status < 300:
                return
            await asyncio.sleep(
                min(self.config.webhook_backoff * 2 ** (attempt - 1), self.config.webhook_max_delay)
            )
        log.warning("relayer.webhook_gave_up", extra={"task": task_id, "type": event_type})


def _is_hex_data(value: str) -> bool:
    if not value.startswith("0x") or len(value) % 2:
        return False
    try:
        bytes.fromhex(value[2:])
    except ValueError:
        return False
    return True


def _is_hex(value: str, size: int) -> bool:
    if not value.startswith("0x") or len(value) != 2 + 2 * size:
        return False
    try:
        bytes.fromhex(value[2:])
    except ValueError:
        return False
    return True
