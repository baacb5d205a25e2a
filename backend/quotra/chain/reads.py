"""The chain reads that run per call, per settled batch or in the background, as bare JSON-RPC: the
head block, a USDC balance, the escrow's one-word views (`view`), and a settlement
transaction's receipt and input.

web3's `AsyncWeb3` spends ~3.5 ms of CPU on one contract read on this machine (its validation
middleware asks the node for the chain id on every call, then formats and checks the request and
the answer both ways); even its provider alone costs ~0.7 ms a request, and its formatting of
landed settlement batches' receipts took 0.71 s of a 20 s profile of the x402 path. The x402 gate
reads the head every `x402_head_cache_seconds` and each payer's balance once per block it pays
in; the settlement worker and the indexer read each landed batch's receipt and input; the prepaid
account mirror reads each account's deposit, withdrawal and permission state. Those go out here:
one keep-alive aiohttp session, calldata from a selector computed once, and only what Quotra
reads of an answer converted (numbers to int; hashes, topics and data to bytes). Everything else
(sending, claims, admin) stays on web3.
"""

from __future__ import annotations

import itertools
from typing import Any, Final

import aiohttp
import msgspec
from eth_utils import function_signature_to_4byte_selector

_WORD: Final = 64  # hex digits of one ABI word
_BALANCE_OF: Final = "0x" + function_signature_to_4byte_selector("balanceOf(address)").hex()
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class ChainReadError(Exception):
    """The node answered an error, or nothing usable."""


class ChainReads:
    def __init__(self, url: str, *, timeout: float) -> None:
        self.url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use: a session belongs to the running event loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                headers={"Content-Type": "application/json"},
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def _request(self, method: str, params: list[Any]) -> Any:
        body = _encode({"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params})
        async with self._open().post(self.url, data=body) as response:
            raw = await response.read()
            if response.status != 200:
                raise ChainReadError(f"{method}: the node answered HTTP {response.status}")
        try:
            answer = _decode(raw)
        except msgspec.DecodeError:
            raise ChainReadError(f"{method}: the node's answer is not JSON") from None
        if not isinstance(answer, dict) or "result" not in answer:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise ChainReadError(f"{method}: {error!r}")
        return answer["result"]

    async def block_number(self) -> int:
        return int(await self._request("eth_blockNumber", []), 16)

    async def balance_of(self, token: str, account: str, block: int | None = None) -> int:
        """An ERC-20 `balanceOf(account)`, at `block` (the latest if None)."""
        return (await self.view(token, _BALANCE_OF, (account,), 1, block))[0]

    async def view(
        self,
        to: str,
        selector: str,
        args: tuple[str | bytes | int, ...],
        words: int,
        block: int | None = None,
    ) -> list[int]:
        """A view function whose arguments and answer are static ABI words (addresses as hex
        strings, bytes32 as bytes, uints): its answer's `words` words as ints."""
        data = selector + "".join(_word(arg) for arg in args)
        tag = "latest" if block is None else hex(block)
        result = await self._request("eth_call", [{"to": to, "data": data}, tag])
        if not isinstance(result, str) or len(result) != 2 + _WORD * words:
            raise ChainReadError(f"eth_call {selector}: unexpected answer {str(result)[:80]!r}")
        return [int(result[2 + _WORD * i : 2 + _WORD * (i + 1)], 16) for i in range(words)]

    async def receipt(self, tx_hash: str) -> dict[str, Any] | None:
        """The transaction's receipt, None while it is not mined."""
        return receipt_of(await self._request("eth_getTransactionReceipt", [tx_hash]))

    async def transaction_input(self, tx_hash: str) -> bytes:
        raw = await self._request("eth_getTransactionByHash", [tx_hash])
        if not isinstance(raw, dict) or not isinstance(raw.get("input"), str):
            raise ChainReadError(f"eth_getTransactionByHash: no transaction {tx_hash}")
        return _bytes(raw["input"])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def receipt_of(raw: Any) -> dict[str, Any] | None:
    """`eth_getTransactionReceipt`'s result with what Quotra reads converted (None: not mined)."""
    if raw is None:
        return None
    try:
        return {
            "transactionHash": _bytes(raw["transactionHash"]),
            "blockNumber": int(raw["blockNumber"], 16),
            "status": int(raw["status"], 16),
            "gasUsed": int(raw["gasUsed"], 16),
            "logs": [_log(entry) for entry in raw["logs"]],
        }
    except (KeyError, TypeError, ValueError):
        raise ChainReadError(f"eth_getTransactionReceipt: unexpected answer {str(raw)[:80]!r}") from None


def _word(arg: str | bytes | int) -> str:
    if isinstance(arg, str):  # an address
        return arg.lower().removeprefix("0x").rjust(_WORD, "0")
    if isinstance(arg, bytes):  # bytes32
        if len(arg) != 32:
            raise ValueError("a bytes32 argument must be 32 bytes")
        return arg.hex()
    return arg.to_bytes(32, "big").hex()


def _bytes(value: str) -> bytes:
    return bytes.fromhex(value[2:])  # a fifth of HexBytes' parsing, and a receipt has hundreds


def _log(raw: dict[str, Any]) -> dict[str, Any]:
    """A log entry with the fields event decoding reads (web3's `process_log`)."""
    return {
        "address": raw["address"],
        "topics": [_bytes(topic) for topic in raw["topics"]],
        "data": _bytes(raw["data"]),
        "blockNumber": int(raw["blockNumber"], 16),
        "blockHash": _bytes(raw["blockHash"]),
        "transactionHash": _bytes(raw["transactionHash"]),
        "transactionIndex": int(raw["transactionIndex"], 16),
        "logIndex": int(raw["logIndex"], 16),
    }
