"""x402 test support: terms of a fake escrow, a fake chain for the gate's reads (as of a block), and
payment headers signed exactly as the stock client signs them (or deliberately wrong)."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from typing import Any

from eth_account import Account
from eth_utils import to_checksum_address
from quotra.chain import eip712
from quotra.chain.deployment import BASE_SEPOLIA_USDC
from quotra.payments.x402 import PaymentTerms

ESCROW = to_checksum_address("0x" + "e5" * 20)
TERMS = PaymentTerms(84532, BASE_SEPOLIA_USDC, "USDC", "2", ESCROW)
OPERATOR = Account.from_key("0x" + "4f" * 32)


class FakeChain:
    """The chain reads of the paid-call path (the head block, a payer's USDC balance and whether
    USDC marks a nonce used, both as of a block), answered from dictionaries. Balances are kept
    per block: `fund` sets an account's balance from the current head on, `mine` moves the head."""

    def __init__(self, head: int = 100) -> None:
        self.head = head
        self.history: dict[str, list[tuple[int, int]]] = {}
        self.used: set[tuple[str, bytes]] = set()
        self.reads = 0
        self.balance_reads = 0
        self.head_reads = 0
        self.blocks_read: list[int] = []

    def fund(self, account: str, balance: int) -> None:
        """`account` holds `balance` from the current head block on."""
        self.history.setdefault(to_checksum_address(account), []).append((self.head, balance))

    def mine(self, blocks: int = 1) -> int:
        self.head += blocks
        return self.head

    def balance_of(self, account: str, block: int) -> int:
        balance = 0
        for since, value in self.history.get(to_checksum_address(account), []):
            if since <= block:
                balance = value
        return balance

    async def block_number(self) -> int:
        self.reads += 1
        self.head_reads += 1
        await asyncio.sleep(0.002)  # an RPC round trip: concurrent requests overlap
        return self.head

    async def usdc_balance(self, account: str, block: int | None = None) -> int:
        self.reads += 1
        self.balance_reads += 1
        at = self.head if block is None else block
        self.blocks_read.append(at)
        await asyncio.sleep(0.002)
        return self.balance_of(account, at)

    async def authorization_used(self, payer: str, nonce: bytes, block: int | None = None) -> bool:
        self.reads += 1
        await asyncio.sleep(0.002)
        return (to_checksum_address(payer), nonce) in self.used


def b64(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def unb64(value: str) -> Any:
    return json.loads(base64.b64decode(value))


def offer(reply: Any) -> dict[str, Any]:
    """The v2 PaymentRequired of a 402 reply (from its header)."""
    assert reply.status_code == 402, reply.text
    return unb64(reply.headers["payment-required"])


def authorization(
    payer: Any,
    requirements: dict[str, Any],
    *,
    value: int | None = None,
    to: str | None = None,
    valid_after: int = 0,
    valid_before: int | None = None,
    nonce: bytes | None = None,
    signer_key: Any = None,
    high_s: bool = False,
    domain: eip712.Domain | None = None,
) -> dict[str, Any]:
    """The `payload` of an exact EVM payment, as the stock client builds it."""
    message = {
        "from": payer.address,
        "to": to or requirements["payTo"],
        "value": int(requirements["amount"]) if value is None else value,
        "validAfter": valid_after,
        "validBefore": valid_before or int(time.time()) + int(requirements["maxTimeoutSeconds"]),
        "nonce": nonce or secrets.token_bytes(32),
    }
    sig = eip712.sign(signer_key or payer.key, domain or TERMS.domain, "TransferWithAuthorization", message)
    raw = sig.raw
    if high_s:
        s = eip712.SECP256K1_N - int.from_bytes(sig.s, "big")
        raw = sig.r + s.to_bytes(32, "big") + bytes([55 - sig.v])  # same signer, the other s
    return {
        "signature": "0x" + raw.hex(),
        "authorization": {
            "from": message["from"],
            "to": message["to"],
            "value": str(message["value"]),
            "validAfter": str(message["validAfter"]),
            "validBefore": str(message["validBefore"]),
            "nonce": "0x" + message["nonce"].hex(),
        },
    }


def v2_header(requirements: dict[str, Any], payload: dict[str, Any], **accepted: Any) -> str:
    return b64({"x402Version": 2, "accepted": {**requirements, **accepted}, "payload": payload})


def v1_header(payload: dict[str, Any], network: str = "base-sepolia") -> str:
    return b64({"x402Version": 1, "scheme": "exact", "network": network, "payload": payload})
