"""What a call is: its id, gates, states, the view the relay and its clients read, and the ways a
reservation can be refused. No I/O here."""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Final, Literal

from quotra.money import usdc
from quotra.ratelimit import Decision

Gate = Literal["playground", "x402", "prepaid", "sandbox"]
State = Literal["reserved", "captured", "settling", "reconciling", "settled", "voided", "failed", "refunded"]
Outcome = Literal["ok", "cancelled", "upstream_error", "error"]

# States in which a call's money is still in flight (it counts against its payer's budget).
OPEN: Final = ("reserved", "captured", "settling", "reconciling")
# Gates whose calls are settled on-chain; the others owe nothing.
PAID_GATES: Final = ("x402", "prepaid")
# An x402 call's error once its authorization was used outside the escrow; kept when the operator
# reconciles it (the escrow then credits the charge only: no rest goes to the payer's deposit).
FRONT_RUN: Final = "front-run: the authorization was used outside the escrow"

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# RFC 4648's base32 alphabet to Crockford's: the C encoder does the work, digit for digit.
_TO_CROCKFORD: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD.encode())
CALL_ID_PATTERN: Final = r"^call_[0-9A-HJKMNP-TV-Z]{26}$"


def new_call_id(now_ms: int | None = None) -> str:
    """`call_` + a ULID: 48 bits of milliseconds then 80 random bits, Crockford base32, so ids
    sort by creation time and never collide across replicas."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    # 160 bits encode to 32 digits; the ULID's 26 are the last ones (the first 6 are zeros).
    digits = base64.b32encode(value.to_bytes(20, "big"))[6:]
    return "call_" + digits.translate(_TO_CROCKFORD).decode()


def payer_ids(wallet: str) -> tuple[str, str]:
    """The ids a wallet's calls are stored under: the checksummed address (x402, prepaid) and
    `wallet:<lower case>` (the playground, signed in)."""
    return wallet, f"wallet:{wallet.lower()}"


@dataclass(frozen=True)
class CallView:
    """A call as stored (`quotra.store.models.Call`), immutable."""

    id: str
    gate: str
    state: str
    listing_id: str
    provider: str
    payer: str
    key_id: str | None
    permission_digest: str | None
    app_id: str | None
    end_user: str | None
    model: str
    stream: bool
    reserved: int
    amount: int
    markup: int
    granted: int
    fee: int | None
    prompt_tokens: int
    completion_tokens: int
    outcome: str | None
    duration_ms: int | None
    error: str | None
    expires_at: datetime
    batch_id: int | None
    tx_hash: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> CallView:
        """From an ORM object or a Core row with the `calls` columns."""
        mapping = row._mapping if hasattr(row, "_mapping") else None
        return cls(
            **{
                f.name: (mapping[f.name] if mapping is not None else getattr(row, f.name))
                for f in fields(cls)
            }
        )

    @property
    def charged(self) -> bool:
        """Whether the payer owes (or paid) this call's amount in USDC (a sandbox key's calls are
        metered against the key, never charged)."""
        return (
            self.gate in PAID_GATES
            and self.state in ("captured", "settling", "reconciling", "settled")
            and self.amount > 0
        )

    @property
    def returned(self) -> int:
        """x402: the unused rest of the payer's authorization (`reserved` less the charge), which
        the escrow credits to the payer's deposit when it settles the call's payment. Nothing
        for other gates, for calls not charged (their authorization is never used), and for a
        front-run authorization (reconciled: the escrow credits its charge only)."""
        if self.gate != "x402" or not self.charged or self.error == FRONT_RUN:
            return 0
        return self.reserved - self.amount

    @property
    def metered(self) -> bool:
        """Whether the call counts at its amount in usage: charged, or served on a sandbox key
        (metered against the key's cap in test money, never settled)."""
        return self.charged or (self.gate == "sandbox" and self.state == "settled")


@dataclass(frozen=True)
class X402Hold:
    """An x402 authorization to reserve, verified by the gate, and the payer's balance snapshot."""

    payer: str
    nonce: str  # 0x-hex, lower case
    value: int
    valid_after: int
    valid_before: int
    signature: str
    request_hash: str
    balance: int  # the payer's USDC balance as of `block`
    block: int


class Refused(Exception):
    """A reservation that cannot be made; nothing was written.

    reasons: listing_unavailable (paused, expired or no calls left), daily_free_calls_used (the
    listing's free calls today), free_calls_used (the consumer's on the listing), key_revoked,
    rate_limited (the API key's requests per minute: `rate`), key_cap, no_permission, permission,
    deposit, user_limit (an app's end user's grants and spend limit), insufficient_balance (x402),
    payer_unpaid (x402: an earlier authorization of the payer did not pay), nonce_used (x402:
    `call` is the call this authorization already paid for)."""

    def __init__(self, reason: str, call: CallView | None = None, rate: Decision | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.call = call
        self.rate = rate  # rate_limited: the key's limit, for the 429's headers


def summary(call: CallView) -> dict[str, Any]:
    """What a call's payer may know of it: `GET /v1/calls/{id}` and an x402 replay's answer."""
    return {
        "id": call.id,
        "object": "quotra.call",
        "gate": call.gate,
        "state": call.state,
        "charged": call.charged,
        "amount": usdc(call.amount if call.charged else 0),
        "amount_atomic": call.amount if call.charged else 0,
        "returned_to_deposit_atomic": call.returned,
        "markup_atomic": call.markup if call.charged else 0,
        "app": call.app_id,
        "end_user": call.end_user,
        "reserved_atomic": call.reserved,
        "fee_atomic": call.fee,
        "listing": call.listing_id,
        "provider": call.provider,
        "model": call.model,
        "stream": call.stream,
        "usage": {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens},
        "outcome": call.outcome,
        "error": call.error,
        "transaction": call.tx_hash,
        "created_at": call.created_at.isoformat(),
        "updated_at": call.updated_at.isoformat(),
    }
