"""Tables. Money is integer atomic USDC units (6 decimals); times are UTC."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Stored naive in UTC (SQLite has no time zones); always returned aware."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def utc_day(moment: datetime) -> int:
    """The UTC day of `moment`, in days since 1970-01-01 (what daily budgets count by)."""
    return int(moment.timestamp()) // 86_400


class Base(DeclarativeBase):
    pass


def table(model: type[Base]) -> Table:
    """A model's table, typed for Core statements (`insert(table(Call))`)."""
    return cast(Table, model.__table__)


BigId = BigInteger().with_variant(Integer, "sqlite")
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"


class Listing(Base):
    __tablename__ = "listings"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(42), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    base_url: Mapped[str | None] = mapped_column(String(2048))
    models: Mapped[list[str]] = mapped_column(JSON)
    api_key_sealed: Mapped[str] = mapped_column(Text)
    price_per_call: Mapped[int] = mapped_column(BigInteger)
    price_input_per_mtok: Mapped[int | None] = mapped_column(BigInteger)
    price_output_per_mtok: Mapped[int | None] = mapped_column(BigInteger)
    max_calls: Mapped[int | None] = mapped_column(BigInteger)
    calls_used: Mapped[int] = mapped_column(BigInteger, default=0)
    max_input_chars: Mapped[int | None] = mapped_column(Integer)
    max_input_tokens: Mapped[int | None] = mapped_column(Integer)
    max_output_tokens: Mapped[int | None] = mapped_column(Integer)
    rate_per_minute: Mapped[int | None] = mapped_column(Integer)
    # Free playground calls a UTC day across all consumers (None: the relay's default); the ones
    # taken on day `free_calls_day` (days since 1970-01-01) so far.
    free_calls_per_day: Mapped[int | None] = mapped_column(Integer)
    free_calls_day: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    free_calls_today: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16), default="active", index=True)
    failure_streak: Mapped[int] = mapped_column(Integer, default=0)
    cooldown_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class SiweNonce(Base):
    __tablename__ = "siwe_nonces"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PlaygroundUsage(Base):
    __tablename__ = "playground_usage"

    listing_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("listings.id", ondelete="CASCADE"), primary_key=True
    )
    consumer: Mapped[str] = mapped_column(String(128), primary_key=True)
    calls: Mapped[int] = mapped_column(Integer, default=0)


# ---- the call core: one record per call, whatever paid for it ------------------------------------
# Amounts are atomic USDC. Addresses are checksummed. uint256 values that can exceed 64 bits
# (salts, nonces) are stored as 0x-hex strings.


class Call(Base):
    """One relayed call and its money, for every gate (playground, x402, prepaid, sandbox).

    state: reserved → captured → settling → settled, or reserved → voided (nothing charged);
    settling → reconciling → settled (a front-run x402 authorization); captured | settling →
    failed (served, but the payment could not settle); settled → refunded. Free calls (playground,
    sandbox keys) go reserved → settled at once: nothing is owed. Reserving and finishing are one
    transaction each (`quotra.calls.store`); a reservation not finished by `expires_at` is voided.
    """

    __tablename__ = "calls"
    __table_args__ = (
        Index("ix_calls_state_expires", "state", "expires_at"),
        Index("ix_calls_payer_created", "payer", "created_at"),
        Index("ix_calls_listing_created", "listing_id", "created_at"),
        Index("ix_calls_app_created", "app_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    gate: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    listing_id: Mapped[str] = mapped_column(String(40))
    provider: Mapped[str] = mapped_column(String(42))
    payer: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str | None] = mapped_column(String(40))
    permission_digest: Mapped[str | None] = mapped_column(String(66))
    # An app key's call: its app and the end user it was made for (`X-Quotra-User`), if any.
    app_id: Mapped[str | None] = mapped_column(String(40))
    end_user: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(200), default="")
    stream: Mapped[bool] = mapped_column(default=False)
    reserved: Mapped[int] = mapped_column(BigInteger)
    # What the payer is charged: the base cost plus `markup`, the app developer's (all of it).
    amount: Mapped[int] = mapped_column(BigInteger, default=0)
    markup: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The part of `amount` an end user's grants paid (the rest was the user's own spending).
    granted: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    fee: Mapped[int | None] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str | None] = mapped_column(String(16))
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(300))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    batch_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    tx_hash: Mapped[str | None] = mapped_column(String(66))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class X402Authorization(Base):
    """The x402 specifics of a call: the payer's EIP-3009 authorization, once per (payer, nonce).

    `pending` counts its value against the payer's balance snapshot until that snapshot covers
    the block it settled in (`settled_block`); a voided or failed one never moved money.
    """

    __tablename__ = "x402_authorizations"
    __table_args__ = (
        UniqueConstraint("payer", "nonce", name="uq_x402_payer_nonce"),
        Index("ix_x402_payer_pending", "payer", "pending"),
    )

    call_id: Mapped[str] = mapped_column(String(32), ForeignKey("calls.id"), primary_key=True)
    payer: Mapped[str] = mapped_column(String(42))
    nonce: Mapped[str] = mapped_column(String(66))
    value: Mapped[int] = mapped_column(BigInteger)
    valid_after: Mapped[int] = mapped_column(BigInteger)
    valid_before: Mapped[int] = mapped_column(BigInteger)
    signature: Mapped[str] = mapped_column(String(132))
    request_hash: Mapped[str] = mapped_column(String(64))
    pending: Mapped[bool] = mapped_column(default=True)
    settled_block: Mapped[int | None] = mapped_column(BigInteger)


class X402Payer(Base):
    """A payer's USDC balance as of a known block: what x402 calls are reserved against; and how
    many of its authorizations did not pay (refused by USDC at settlement, or used outside the
    escrow): a payer with any is refused x402."""

    __tablename__ = "x402_payers"

    payer: Mapped[str] = mapped_column(String(42), primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger)
    block: Mapped[int] = mapped_column(BigInteger)
    unpaid: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ConsumerAccount(Base):
    """A consumer wallet's prepaid position as the relay sees it.

    available = min(deposit - pending_withdrawal, permission_allowance - permission_spent)
                - reserved - unsettled
    `deposit`, `pending_withdrawal` and `permission_spent` mirror the escrow (refreshed by the
    indexer); `reserved` (open calls) and `unsettled` (captured, not yet on-chain) are the relay's.
    """

    __tablename__ = "consumer_accounts"
    __table_args__ = (
        CheckConstraint("reserved >= 0", name="ck_accounts_reserved_nonnegative"),
        CheckConstraint("unsettled >= 0", name="ck_accounts_unsettled_nonnegative"),
    )

    wallet: Mapped[str] = mapped_column(String(42), primary_key=True)
    deposit: Mapped[int] = mapped_column(BigInteger, default=0)
    pending_withdrawal: Mapped[int] = mapped_column(BigInteger, default=0)
    permission_digest: Mapped[str | None] = mapped_column(String(66))
    permission_allowance: Mapped[int] = mapped_column(BigInteger, default=0)
    permission_spent: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    unsettled: Mapped[int] = mapped_column(BigInteger, default=0)
    synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SpendPermissionRecord(Base):
    """A consumer-signed SpendPermission registered with the relay: the wallet's own (its active one
    is on the account) or one it connected to an app (`AppUser.permission_digest`).

    A connected permission keeps its own budget, as the escrow does per digest: a call reserves
    while reserved + unsettled + amount <= allowance - spent. `spent` is what settled under it
    (from the chain when registered, then each settled batch); `reserved` and `unsettled` are
    the relay's, moved only for connected permissions (the wallet's own is budgeted on its
    account). `revoked_at`: revoked on-chain, or disconnected from its app through the relay;
    either way never charged again."""

    __tablename__ = "spend_permissions"

    digest: Mapped[str] = mapped_column(String(66), primary_key=True)
    consumer: Mapped[str] = mapped_column(String(42), index=True)
    spender: Mapped[str] = mapped_column(String(42))
    allowance: Mapped[int] = mapped_column(BigInteger)
    valid_after: Mapped[int] = mapped_column(BigInteger)
    valid_until: Mapped[int] = mapped_column(BigInteger)
    salt: Mapped[str] = mapped_column(String(66))
    # The app developer its charges may pay a markup (the zero address: none), and the most.
    developer: Mapped[str] = mapped_column(String(42), default=ZERO_ADDRESS, server_default=ZERO_ADDRESS)
    max_markup_bps: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    signature: Mapped[str] = mapped_column(Text)
    spent: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reserved: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    unsettled: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKeyRecord(Base):
    """A prepaid API key `sk-quotra-…`: only its SHA-256 is stored; shown once at creation. An
    app's key (`app_id`) charges its calls to the app owner's (`wallet`) deposit with the app's
    markup. `rate_per_minute` overrides the relay's default rate limit for keys."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("reserved >= 0", name="ck_api_keys_reserved_nonnegative"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    wallet: Mapped[str] = mapped_column(String(42), index=True)
    app_id: Mapped[str | None] = mapped_column(String(40), index=True)
    rate_per_minute: Mapped[int | None] = mapped_column(Integer)
    # Its rate limit's state: the theoretical arrival time of its next request (µs since the epoch).
    rate_tat: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    name: Mapped[str] = mapped_column(String(100), default="")
    mode: Mapped[str] = mapped_column(String(8), default="live")  # live | sandbox
    spend_cap: Mapped[int | None] = mapped_column(BigInteger)
    spent: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class App(Base):
    """A developer's app: its keys' calls cost the base price plus `markup_bps` of it, and the
    markup is the developer's, all of it (the escrow credits it to `owner`)."""

    __tablename__ = "apps"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(42), index=True)
    name: Mapped[str] = mapped_column(String(100))
    markup_bps: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class AppUser(Base):
    """An app's end user (`X-Quotra-User`): hosted (billed to the developer's deposit), or, once
    it connected `wallet` (`permission_digest`: the wallet's spend permission for this app), billed
    to its own deposit under that permission. A wallet may be connected to many apps at once, each
    under its own permission; disconnected, the user is hosted again (developer billing).

    `granted` (free balance the developer gave) is spent first: `grant_used` of it so far; what
    grants do not cover is the user's own spending, `spent`, capped by `spend_limit` if set.
    `reserved` holds the user's open calls: a call may reserve while
    reserved + amount <= (granted - grant_used) + (spend_limit - spent)."""

    __tablename__ = "app_users"
    __table_args__ = (
        CheckConstraint("reserved >= 0", name="ck_app_users_reserved_nonnegative"),
        CheckConstraint("grant_used <= granted", name="ck_app_users_grant_within"),
    )

    app_id: Mapped[str] = mapped_column(String(40), ForeignKey("apps.id"), primary_key=True)
    external_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    wallet: Mapped[str | None] = mapped_column(String(42))
    permission_digest: Mapped[str | None] = mapped_column(String(66), index=True)  # the wallet's, for the app
    spend_limit: Mapped[int | None] = mapped_column(BigInteger)
    spent: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reserved: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    granted: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    grant_used: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def new_app_user(app_id: str, external_id: str, now: datetime) -> dict[str, Any]:
    """The row of an end user the app has not served yet: hosted, nothing granted, spent or limited."""
    return {
        "app_id": app_id,
        "external_id": external_id,
        "wallet": None,
        "permission_digest": None,
        "spend_limit": None,
        "spent": 0,
        "reserved": 0,
        "granted": 0,
        "grant_used": 0,
        "created_at": now,
    }


class Grant(Base):
    """Free balance a developer gave: to a hosted end user (an off-chain sub-budget of the
    developer's deposit) or to a wallet (a `deposit(amount, wallet)` the developer made on-chain,
    `tx_hash`)."""

    __tablename__ = "grants"
    __table_args__ = (Index("ix_grants_app_created", "app_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    app_id: Mapped[str] = mapped_column(String(40), ForeignKey("apps.id"))
    external_user_id: Mapped[str | None] = mapped_column(String(128))
    wallet: Mapped[str | None] = mapped_column(String(42))
    amount: Mapped[int] = mapped_column(BigInteger)
    description: Mapped[str] = mapped_column(String(300), default="", server_default="")
    tx_hash: Mapped[str | None] = mapped_column(String(66), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RateLimit(Base):
    """A rate limit's state, shared by every replica: the generic cell rate algorithm's
    theoretical arrival time of the next request, in microseconds since the epoch."""

    __tablename__ = "rate_limits"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    tat: Mapped[int] = mapped_column(BigInteger)


class SettlementBatch(Base):
    """One settlement transaction: `settle_authorizations` (kind x402) or `settle_charges` (charges).

    status: pending → submitted → confirmed | failed. A charges batch's `reference` settles once
    on-chain (the escrow refuses it again) and is echoed in its events.
    """

    __tablename__ = "settlement_batches"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    permission_digest: Mapped[str | None] = mapped_column(String(66))
    reference: Mapped[str] = mapped_column(String(66), unique=True)
    amount: Mapped[int] = mapped_column(BigInteger, default=0)
    items: Mapped[int] = mapped_column(Integer, default=0)
    submission_id: Mapped[str | None] = mapped_column(String(100))
    tx_hash: Mapped[str | None] = mapped_column(String(66), index=True)
    gas_used: Mapped[int | None] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ChainCursor(Base):
    """How far the escrow event indexer has read (one row per contract)."""

    __tablename__ = "chain_cursors"

    contract: Mapped[str] = mapped_column(String(42), primary_key=True)
    block: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


# ---- ETH-free claims, revocations and relayer webhooks (migration 0004) ----------------------------
# uint256 caps of signed grants are stored as decimal strings (they may exceed 64 bits).


class DelegationRecord(Base):
    """A provider-signed Delegation the relay has seen: revoked ones are never sent again."""

    __tablename__ = "delegations"

    digest: Mapped[str] = mapped_column(String(66), primary_key=True)
    provider: Mapped[str] = mapped_column(String(42), index=True)
    delegate: Mapped[str] = mapped_column(String(42))
    payee: Mapped[str] = mapped_column(String(42))
    max_amount: Mapped[str] = mapped_column(String(78))
    relayer_fee: Mapped[str] = mapped_column(String(78))
    valid_until: Mapped[str] = mapped_column(String(78))
    salt: Mapped[str] = mapped_column(String(78))
    signature: Mapped[str] = mapped_column(Text)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ClaimRecord(Base):
    """One ETH-free claim: requested → submitted → confirmed | failed (from webhooks and the poller)."""

    __tablename__ = "claims"
    __table_args__ = (Index("ix_claims_status_check", "status", "next_check_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    provider: Mapped[str] = mapped_column(String(42), index=True)
    payee: Mapped[str] = mapped_column(String(42))
    delegation_digest: Mapped[str] = mapped_column(String(66), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    relayer_fee: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="requested")
    relayer: Mapped[str] = mapped_column(String(16))
    task_id: Mapped[str | None] = mapped_column(String(100), index=True)
    tx_hash: Mapped[str | None] = mapped_column(String(66))
    block_number: Mapped[int | None] = mapped_column(BigInteger)
    # `escrow` (claim_with_delegation) or `erc7710` (redeemed through MetaMask's DelegationManager,
    # the redemption as sent kept as JSON for resends; migration 0009).
    kind: Mapped[str] = mapped_column(String(16), default="escrow", server_default="escrow")
    redemption: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(String(300))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_check_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class RevocationRecord(Base):
    """A gasless `revoke_with_signature` sent through the relayer (same states as a claim)."""

    __tablename__ = "revocations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account: Mapped[str] = mapped_column(String(42), index=True)
    item: Mapped[str] = mapped_column(String(66), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # delegation | permission | allowance | unknown
    signature: Mapped[str] = mapped_column(Text)
    # A framework delegation's `disableDelegation` redemption as sent (JSON; migration 0009), else None.
    redemption: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="requested")
    relayer: Mapped[str] = mapped_column(String(16))
    task_id: Mapped[str | None] = mapped_column(String(100), index=True)
    tx_hash: Mapped[str | None] = mapped_column(String(66))
    error: Mapped[str | None] = mapped_column(String(300))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_check_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class WebhookEventRecord(Base):
    """A relayer webhook already processed: a replay of (event id, type) is acknowledged, not applied."""

    __tablename__ = "webhook_events"

    event_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    type: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    format: Mapped[str] = mapped_column(String(16))
    task_id: Mapped[str] = mapped_column(String(100))
    memo: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# ---- MetaMask's Delegation Framework (migration 0009) ---------------------------------------------


class AllowanceRecord(Base):
    """A consumer's periodic USDC allowance to the relay's operator (an ERC-7715
    `erc20-token-periodic` grant), redeemed to top up its deposit."""

    __tablename__ = "allowances"

    hash: Mapped[str] = mapped_column(String(66), primary_key=True)  # the delegation's hash
    wallet: Mapped[str] = mapped_column(String(42), index=True)
    context: Mapped[str] = mapped_column(Text)  # 0x-hex abi.encode(Delegation[])
    period_amount: Mapped[int] = mapped_column(BigInteger)
    period_duration: Mapped[int] = mapped_column(BigInteger)
    start_date: Mapped[int] = mapped_column(BigInteger)
    expiry: Mapped[int | None] = mapped_column(BigInteger)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_top_up_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
