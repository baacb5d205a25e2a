"""A client of a 1Shot-style permissionless relayer (JSON-RPC 2.0 over HTTP POST), as a `Relayer`.

The relayer pays the gas of an escrow call whose calldata carries its own grant (a provider's
signed `Delegation` paying `relayer_fee` to `msg.sender`, a consumer's EIP-3009 authorization or
signed withdrawal step, a signed `Revocation`; `permissionContext` is then `[]`), or redeems
ERC-7710 delegations of a MetaMask smart account through the framework's DelegationManager (each
transaction's `permissionContext` is `abi.encode(Delegation[])`, its executions what the account
runs; one of them pays the relayer's fee in USDC), so a provider or consumer never needs ETH. The
local relayer for the twin (`quotra relayer`, `quotra_dev.relayer`) speaks exactly these shapes;
they follow the 1Shot public relayer's.

Requests (`{"jsonrpc": "2.0", "id": <int>, "method": ..., "params": ...}`) and results:

`relayer_getCapabilities`, params `["84532"]` (chain ids as decimal strings) →
    `{"84532": {"feeCollector": "0x…", "targetAddress": "0x…",
                "tokens": [{"address": "0x…", "symbol": "USDC", "name": "USDC", "decimals": 6}]}}`
    `targetAddress` submits the transactions (it is `msg.sender`, so a Delegation's `delegate`
    may name it); `feeCollector` receives the fees (the same address for the local relayer).

`relayer_getFeeData`, params `{"chainId": "84532", "token": "0x…"}` →
    `{"chainId": "84532", "token": {"address", "decimals", "symbol", "name"}, "rate": <float,
      native wei → token atoms>, "minFee": "<atoms>", "expiry": <unix s>, "gasPrice": "0x…",
      "feeCollector": "0x…", "targetAddress": "0x…", "context": "<signed quote>"}`
    The quote (`context`) lives ~30 s; a claim must pay at least `minFee` (its `relayer_fee`).

`relayer_send7710Transaction`, params
    `{"chainId": "84532", "transactions": [{"permissionContext": [] | "0x<abi.encode(Delegation[])>",
       "executions": [{"target": "0x…", "value": "0", "data": "0x<calldata>"}]}, …],
      "authorizationList"?: [{"chainId", "address", "nonce", "yParity", "r", "s"}],
      "context"?: "<quote>", "taskId"?: "0x<32 bytes>", "destinationUrl"?: "<≤256 chars>",
      "memo"?: "<≤256 chars>"}` → `"0x<taskId>"`.
    With permission contexts the relayer sends `redeemDelegations` of all the transactions in one
    call (an `authorizationList` makes it a type-4 transaction: the accounts become EIP-7702
    smart accounts first).
    A client-chosen `taskId` makes a resend idempotent: the relayer answers `4214 Duplicate Task
    ID` and nothing is sent twice.

`relayer_getStatus`, params `{"id": "0x<taskId>", "logs": false}` →
    `{"id", "chainId", "createdAt": <unix s>, "status": 100|110|200|400|500, "memo"?,
      "hash"? (110 and later), "receipt"? (200: {"blockHash", "blockNumber", "gasUsed",
      "transactionHash", "logs"?}), "message"? (400, 500), "data"? (500: revert data)}`

Errors are JSON-RPC errors `{"code", "message", "data"?}`: -32600/-32601/-32602 malformed,
-32603/-1 internal (retry), 4200 insufficient payment, 4203 rate limited (retry), 4204 quote
expired, 4206 unsupported chain, 4208 unknown task, 4209 unsupported capability (target or call
not relayed), 4211 simulation failed (`data` = revert reason), 4213 invalid task id, 4214
duplicate task id.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from dataclasses import dataclass
from typing import Any, Final

import httpx
from eth_utils import to_checksum_address

from quotra.chain.relayer import ChainCall, RelayerError, Submission, TxState

log = logging.getLogger("quotra.relayer.oneshot")

# 1Shot's JSON-RPC error codes.
INTERNAL_ERRORS: Final = frozenset({-32603, -1})
INSUFFICIENT_PAYMENT: Final = 4200
RATE_LIMITED: Final = 4203
QUOTE_EXPIRED: Final = 4204
UNSUPPORTED_CHAIN: Final = 4206
UNKNOWN_TASK: Final = 4208
UNSUPPORTED_CAPABILITY: Final = 4209
SIMULATION_FAILED: Final = 4211
INVALID_TASK_ID: Final = 4213
DUPLICATE_TASK: Final = 4214
MAX_MEMO: Final = 256
MAX_DESTINATION_URL: Final = 256


class OneShotError(RelayerError):
    """The relayer answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{code} {message}" + (f": {data}" if data else ""))
        self.code = code
        self.message = message
        self.data = data

    @property
    def retryable(self) -> bool:
        return self.code in INTERNAL_ERRORS or self.code == RATE_LIMITED


class UnknownTask(OneShotError):
    """The relayer does not know this task id (never received, or it forgot it)."""


@dataclass(frozen=True)
class Capabilities:
    chain_id: int
    fee_collector: str
    target_address: str
    tokens: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class FeeData:
    token: str
    decimals: int
    min_fee: int
    rate: float
    gas_price: int
    expiry: int
    fee_collector: str
    target_address: str | None
    context: str | None


def new_task_id() -> str:
    return "0x" + secrets.token_hex(32)


def _int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    text = str(value)
    return int(text, 16) if text.startswith("0x") else int(text)


def submission_from_status(status: dict[str, Any]) -> Submission:
    """A `Submission` from a `relayer_getStatus` object (also a webhook's `data`)."""
    try:
        state = TxState(int(status["status"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise RelayerError(f"relayer status without a known status code: {status!r:.200}") from exc
    raw_receipt = status.get("receipt")
    receipt: dict[str, Any] = raw_receipt if isinstance(raw_receipt, dict) else {}
    tx_hash = status.get("hash") or receipt.get("transactionHash")
    error = None
    if state in (TxState.REJECTED, TxState.REVERTED):
        error = str(status.get("message") or status.get("data") or state.name.lower())
    return Submission(
        id=str(status.get("id", "")),
        state=state,
        tx_hash=str(tx_hash) if tx_hash else None,
        block_number=_int(receipt.get("blockNumber")),
        gas_used=_int(receipt.get("gasUsed")),
        error=error,
        memo=status.get("memo") if isinstance(status.get("memo"), str) else None,
    )


class OneShotRelayer:
    """`Relayer` over a 1Shot-style relayer. Webhooks go to `destination_url` when set."""

    name = "oneshot"

    def __init__(
        self,
        url: str,
        *,
        chain_id: int,
        token: str | None = None,
        destination_url: str | None = None,
        http: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
    ) -> None:
        if destination_url is not None and len(destination_url) > MAX_DESTINATION_URL:
            raise ValueError(f"destinationUrl must be at most {MAX_DESTINATION_URL} characters")
        self.url = url
        self.chain_id = chain_id
        self.token = to_checksum_address(token) if token else None
        self.destination_url = destination_url
        self.timeout = timeout
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._owns_http = http is None
        self._ids = itertools.count(1)
        self._capabilities: Capabilities | None = None

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def call(self, method: str, params: Any) -> Any:
        """One JSON-RPC call. `OneShotError` for an error answer, `RelayerError` if unreachable."""
        payload = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        try:
            reply = await self._http.post(self.url, json=payload, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise RelayerError(f"relayer unreachable ({method}): {type(exc).__name__}") from exc
        try:
            body = reply.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or ("result" not in body and "error" not in body):
            raise RelayerError(f"relayer answered HTTP {reply.status_code} without JSON-RPC ({method})")
        if (error := body.get("error")) is not None:
            code = int(error.get("code", -1)) if isinstance(error, dict) else -1
            message = str(error.get("message", "")) if isinstance(error, dict) else str(error)
            data = error.get("data") if isinstance(error, dict) else None
            cls = UnknownTask if code == UNKNOWN_TASK else OneShotError
            raise cls(code, message, data)
        return body["result"]

    # ---- discovery and quotes ------------------------------------------------------------------

    async def capabilities(self, *, refresh: bool = False) -> Capabilities:
        if self._capabilities is None or refresh:
            result = await self.call("relayer_getCapabilities", [str(self.chain_id)])
            entry = result.get(str(self.chain_id)) if isinstance(result, dict) else None
            if not isinstance(entry, dict):
                raise OneShotError(UNSUPPORTED_CHAIN, f"the relayer does not serve chain {self.chain_id}")
            self._capabilities = Capabilities(
                chain_id=self.chain_id,
                fee_collector=to_checksum_address(entry["feeCollector"]),
                target_address=to_checksum_address(entry["targetAddress"]),
                tokens=tuple(entry.get("tokens") or ()),
            )
        return self._capabilities

    async def _token(self) -> str:
        if self.token is None:
            tokens = (await self.capabilities()).tokens
            usdc = [t for t in tokens if str(t.get("symbol", "")).upper() == "USDC"] or list(tokens)
            if not usdc:
                raise OneShotError(4202, "the relayer accepts no payment token")
            self.token = to_checksum_address(usdc[0]["address"])
        return self.token

    async def fee_data(self) -> FeeData:
        result = await self.call(
            "relayer_getFeeData", {"chainId": str(self.chain_id), "token": await self._token()}
        )
        token = result.get("token") or {}
        return FeeData(
            token=to_checksum_address(token.get("address") or await self._token()),
            decimals=int(token.get("decimals", 6)),
            min_fee=int(result["minFee"]),
            rate=float(result.get("rate", 0)),
            gas_price=_int(result.get("gasPrice")) or 0,
            expiry=int(result["expiry"]),
            fee_collector=to_checksum_address(result["feeCollector"]),
            target_address=to_checksum_address(result["targetAddress"])
            if result.get("targetAddress")
            else None,
            context=result.get("context"),
        )

    # ---- Relayer -------------------------------------------------------------------------------

    def send_params(
        self, call: ChainCall, *, memo: str | None, task_id: str | None, context: str | None
    ) -> dict[str, Any]:
        if memo is not None and len(memo) > MAX_MEMO:
            raise ValueError(f"memo must be at most {MAX_MEMO} characters")
        transactions: list[dict[str, Any]] = [
            {
                "permissionContext": "0x" + entry.context.hex(),
                "executions": [e.as_json() for e in entry.executions],
            }
            for entry in call.redemptions
        ] or [
            {
                "permissionContext": [],
                "executions": [{"target": call.to, "value": "0", "data": "0x" + bytes(call.data).hex()}],
            }
        ]
        params: dict[str, Any] = {"chainId": str(self.chain_id), "transactions": transactions}
        if call.authorizations:
            params["authorizationList"] = [a.as_json() for a in call.authorizations]
        optional = {
            "context": context,
            "taskId": task_id,
            "destinationUrl": self.destination_url,
            "memo": memo,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        return params

    async def send(
        self, call: ChainCall, *, memo: str | None = None, task_id: str | None = None
    ) -> Submission:
        """Submit `call`. With `task_id`, a resend of the same task is recognised, never repeated.

        Returns PENDING (accepted) or REJECTED (refused, nothing sent); raises `RelayerError` when
        the relayer cannot be reached or fails internally (whether it received the call is then
        unknown: resend with the same `task_id`, or ask `status`)."""
        for attempt in range(2):
            quote = await self.fee_data()
            params = self.send_params(call, memo=memo, task_id=task_id, context=quote.context)
            try:
                result = await self.call("relayer_send7710Transaction", params)
            except OneShotError as exc:
                if exc.code == DUPLICATE_TASK and task_id is not None:
                    return await self.status(task_id)
                if exc.code == QUOTE_EXPIRED and attempt == 0:
                    continue
                if exc.retryable:
                    raise
                log.info(
                    "relayer.rejected", extra={"label": call.label, "code": exc.code, "reason": str(exc)}
                )
                return Submission(task_id or "", TxState.REJECTED, error=str(exc)[:300], memo=memo)
            log.info("relayer.accepted", extra={"label": call.label, "task": result})
            return Submission(str(result), TxState.PENDING, memo=memo)
        raise RelayerError("the relayer's quote kept expiring")  # pragma: no cover - loop returns

    async def status(self, submission_id: str) -> Submission:
        return submission_from_status(await self.status_raw(submission_id))

    async def status_raw(self, submission_id: str, *, logs: bool = False) -> dict[str, Any]:
        result = await self.call("relayer_getStatus", {"id": submission_id, "logs": logs})
        if not isinstance(result, dict):
            raise RelayerError("relayer_getStatus returned no object")
        return result
