"""A small, fast harness for the escrow's stateful fuzzing: vyper + anvil + raw JSON-RPC.

Kept apart from ape on purpose: the invariant machine sends thousands of transactions, and a
plain HTTP session against one anvil (with `evm_snapshot`/`evm_revert` between examples) is an
order of magnitude faster than going through a framework. Nothing here knows about the model.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_utils import keccak, to_checksum_address

REPO_ROOT = Path(__file__).resolve().parents[3]
VENV_SITE = (
    Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
)
CHAIN_ID = 84532
# anvil's public test mnemonic: these keys are published everywhere and hold no value.
MNEMONIC = "test test test test test test test test test test test junk"
N_ACCOUNTS = 11
TX_GAS = 6_000_000
ERROR_SELECTOR = bytes.fromhex("08c379a0")


class RpcError(RuntimeError):
    """A JSON-RPC error answer."""


# ---------------------------------------------------------------- compile


_COMPILED: dict[str, tuple[list[dict[str, Any]], str]] = {}


def compile_contracts(*relative: str) -> list[tuple[list[dict[str, Any]], str]]:
    """(abi, creation bytecode) of Vyper files, compiled in parallel once per session."""
    missing = [path for path in relative if path not in _COMPILED]
    jobs = {
        path: subprocess.Popen(
            [
                str(Path(sys.prefix) / "bin" / "vyper"),
                "-f",
                "abi,bytecode",
                path,
                "-p",
                str(VENV_SITE),
                "-p",
                ".",
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in missing
    }
    for path, job in jobs.items():
        out, err = job.communicate()
        if job.returncode != 0:
            raise RuntimeError(f"vyper failed on {path}:\n{err}")
        lines = out.splitlines()
        _COMPILED[path] = (json.loads(lines[0]), lines[1].strip())
    return [_COMPILED[path] for path in relative]


# ---------------------------------------------------------------- ABI


def _abi_type(item: dict[str, Any]) -> str:
    typ: str = item["type"]
    if typ.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in item["components"]) + ")" + typ[len("tuple") :]
    return typ


@dataclass(frozen=True)
class Event:
    name: str
    indexed: tuple[tuple[str, str], ...]
    data: tuple[tuple[str, str], ...]


class Abi:
    """Selectors, encoders and event decoders for one contract (no overloads in ours)."""

    def __init__(self, abi: list[dict[str, Any]]) -> None:
        self.functions: dict[str, tuple[bytes, list[str], list[str]]] = {}
        self.events: dict[bytes, Event] = {}
        for item in abi:
            if item["type"] == "function":
                ins = [_abi_type(i) for i in item["inputs"]]
                outs = [_abi_type(o) for o in item["outputs"]]
                selector = keccak(text=f"{item['name']}({','.join(ins)})")[:4]
                self.functions[item["name"]] = (selector, ins, outs)
            elif item["type"] == "event":
                sig = f"{item['name']}({','.join(_abi_type(i) for i in item['inputs'])})"
                self.events[keccak(text=sig)] = Event(
                    item["name"],
                    tuple((i["name"], _abi_type(i)) for i in item["inputs"] if i["indexed"]),
                    tuple((i["name"], _abi_type(i)) for i in item["inputs"] if not i["indexed"]),
                )
        ctor = next((i for i in abi if i["type"] == "constructor"), None)
        self.ctor_types = [_abi_type(i) for i in ctor["inputs"]] if ctor else []

    def encode(self, fn: str, *args: Any) -> str:
        selector, ins, _ = self.functions[fn]
        return "0x" + (selector + abi_encode(ins, list(args))).hex()

    def decode(self, fn: str, data: str) -> Any:
        outs = self.functions[fn][2]
        values = abi_decode(outs, bytes.fromhex(data.removeprefix("0x")))
        return values[0] if len(values) == 1 else values

    def decode_log(self, log: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        topics = [bytes.fromhex(t.removeprefix("0x")) for t in log["topics"]]
        event = self.events.get(topics[0]) if topics else None
        if event is None:
            return None
        args: dict[str, Any] = {}
        for (name, typ), topic in zip(event.indexed, topics[1:], strict=True):
            args[name] = _checksummed(typ, abi_decode([typ], topic)[0])
        values = abi_decode([t for _, t in event.data], bytes.fromhex(log["data"].removeprefix("0x")))
        args.update({name: _checksummed(t, v) for (name, t), v in zip(event.data, values, strict=True)})
        return event.name, args


def _checksummed(typ: str, value: Any) -> Any:
    return to_checksum_address(value) if typ == "address" else value


def revert_reason(data: str | None) -> str | None:
    """The `Error(string)` reason in revert data, or None (empty or custom data)."""
    raw = bytes.fromhex((data or "0x").removeprefix("0x"))
    if raw[:4] != ERROR_SELECTOR:
        return None
    return abi_decode(["string"], raw[4:])[0]


# ---------------------------------------------------------------- anvil


@dataclass
class Receipt:
    status: bool
    reason: str | None
    logs: list[dict[str, Any]]
    block_timestamp: int
    gas_used: int


class Transport:
    """JSON-RPC over one keep-alive HTTP connection with TCP_NODELAY: a few hundred microseconds
    a call, where `requests` spends more than that reading proxy settings from the environment."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def post(self, payload: Any) -> Any:
        body = json.dumps(payload).encode()
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                self.conn.connect()
                assert self.conn.sock is not None
                self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self.conn.request("POST", "/", body, {"Content-Type": "application/json"})
                return json.loads(self.conn.getresponse().read())
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class Chain:
    """One anvil and a keep-alive connection to it."""

    transport: Transport
    process: subprocess.Popen[bytes]
    accounts: list[str]
    keys: list[bytes]
    _id: int = 0
    txs: int = 0

    def rpc(self, method: str, *params: Any) -> Any:
        self._id += 1
        answer = self.transport.post(
            {"jsonrpc": "2.0", "id": self._id, "method": method, "params": list(params)}
        )
        if "error" in answer:
            raise RpcError(f"{method}: {answer['error']}")
        return answer["result"]

    def batch(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """Several read-only calls in one HTTP request, answers in order."""
        if not calls:
            return []
        first = self._id + 1
        self._id += len(calls)
        body = [
            {"jsonrpc": "2.0", "id": first + n, "method": m, "params": p} for n, (m, p) in enumerate(calls)
        ]
        answers = sorted(self.transport.post(body), key=lambda a: a["id"])
        for a in answers:
            if "error" in a:
                raise RpcError(f"batch: {a['error']}")
        return [a["result"] for a in answers]

    def send(self, sender: str, to: str | None, data: str, timestamp: int) -> Receipt:
        """Mines one transaction at exactly `timestamp`; a revert is mined too (status 0)."""
        self.rpc("evm_setNextBlockTimestamp", timestamp)
        tx: dict[str, Any] = {"from": sender, "data": data, "gas": hex(TX_GAS)}
        if to is not None:
            tx["to"] = to
        tx_hash = self.rpc("eth_sendTransaction", tx)
        receipt = self._receipt(tx_hash)
        self.txs += 1
        status = int(receipt["status"], 16) == 1
        reason = None
        if not status:
            trace = self.rpc("debug_traceTransaction", tx_hash, {"tracer": "callTracer"})
            reason = revert_reason(trace.get("output"))
        return Receipt(
            status, reason, receipt["logs"], int(receipt["blockTimestamp"]), int(receipt["gasUsed"], 16)
        )

    def _receipt(self, tx_hash: str) -> dict[str, Any]:
        # anvil answers `eth_sendTransaction` once the tx is queued; automine follows at once.
        for _ in range(2_000):
            receipt = self.rpc("eth_getTransactionReceipt", tx_hash)
            if receipt is not None:
                return receipt
            time.sleep(0.001)
        raise RpcError(f"no receipt for {tx_hash}")

    def deploy(
        self, sender: str, bytecode: str, ctor_types: list[str], args: list[Any], timestamp: int
    ) -> str:
        data = bytecode + abi_encode(ctor_types, args).hex()
        self.rpc("evm_setNextBlockTimestamp", timestamp)
        tx_hash = self.rpc("eth_sendTransaction", {"from": sender, "data": data, "gas": hex(15_000_000)})
        receipt = self._receipt(tx_hash)
        assert int(receipt["status"], 16) == 1, "deployment failed"
        return to_checksum_address(receipt["contractAddress"])

    def call(self, to: str, data: str) -> str:
        return self.rpc("eth_call", {"to": to, "data": data}, "latest")

    def stop(self) -> None:
        self.transport.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dev_keys(n: int = N_ACCOUNTS) -> list[bytes]:
    Account.enable_unaudited_hdwallet_features()
    return [bytes(Account.from_mnemonic(MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}").key) for i in range(n)]


def anvil_path() -> str:
    local = REPO_ROOT / "node_modules" / ".bin" / "anvil"
    return str(local) if local.exists() else "anvil"


@contextlib.contextmanager
def anvil() -> Iterator[Chain]:
    """Starts a private anvil (chain id 84532, prague) on a free port; always stops it."""
    port = _free_port()
    process = subprocess.Popen(
        [
            anvil_path(),
            "--port",
            str(port),
            "--chain-id",
            str(CHAIN_ID),
            "--hardfork",
            "prague",
            "--accounts",
            str(N_ACCOUNTS),
            "--mnemonic",
            MNEMONIC,
            "--silent",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    keys = dev_keys()
    chain = Chain(
        Transport(port),
        process,
        [to_checksum_address(Account.from_key(k).address) for k in keys],
        keys,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                chain.rpc("eth_chainId")
                break
            except (ConnectionError, http.client.HTTPException):
                chain.transport.close()
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("anvil did not start") from None
                time.sleep(0.05)
        yield chain
    finally:
        chain.stop()
