"""Payments: x402 authorizations, prepaid accounts, permissions, API keys and charges,
settlement batches, the append-only ledger and the indexer cursor.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from quotra.store.models import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")

TABLES = (
    "x402_payments",
    "spend_permissions",
    "settlement_batches",
    "prepaid_charges",
    "ledger",
    "consumer_accounts",
    "chain_cursors",
    "api_keys",
)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("wallet", sa.String(length=42), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("spend_cap", sa.BigInteger(), nullable=True),
        sa.Column("spent", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("last_used_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("reserved >= 0", name="ck_api_keys_reserved_nonnegative"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    op.create_index(op.f("ix_api_keys_wallet"), "api_keys", ["wallet"], unique=False)
    op.create_table(
        "chain_cursors",
        sa.Column("contract", sa.String(length=42), nullable=False),
        sa.Column("block", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("contract"),
    )
    op.create_table(
        "consumer_accounts",
        sa.Column("wallet", sa.String(length=42), nullable=False),
        sa.Column("deposit", sa.BigInteger(), nullable=False),
        sa.Column("pending_withdrawal", sa.BigInteger(), nullable=False),
        sa.Column("permission_digest", sa.String(length=66), nullable=True),
        sa.Column("permission_allowance", sa.BigInteger(), nullable=False),
        sa.Column("permission_spent", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), nullable=False),
        sa.Column("unsettled", sa.BigInteger(), nullable=False),
        sa.Column("synced_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("reserved >= 0", name="ck_accounts_reserved_nonnegative"),
        sa.CheckConstraint("unsettled >= 0", name="ck_accounts_unsettled_nonnegative"),
        sa.PrimaryKeyConstraint("wallet"),
    )
    op.create_table(
        "ledger",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("account", sa.String(length=42), nullable=False),
        sa.Column("provider", sa.String(length=42), nullable=True),
        sa.Column("listing_id", sa.String(length=40), nullable=True),
        sa.Column("call_id", sa.BigInteger(), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("fee", sa.BigInteger(), nullable=True),
        sa.Column("reference", sa.String(length=80), nullable=True),
        sa.Column("batch_id", sa.BigInteger(), nullable=True),
        sa.Column("tx_hash", sa.String(length=66), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_ledger_account_created", "ledger", ["account", "created_at"], unique=False)
    op.create_index("ix_ledger_reference", "ledger", ["reference"], unique=False)
    op.create_table(
        "prepaid_charges",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("consumer", sa.String(length=42), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("permission_digest", sa.String(length=66), nullable=False),
        sa.Column("listing_id", sa.String(length=40), nullable=False),
        sa.Column("provider", sa.String(length=42), nullable=False),
        sa.Column("call_id", sa.BigInteger(), nullable=True),
        sa.Column("reserved_amount", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("batch_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_prepaid_charges_batch_id"), "prepaid_charges", ["batch_id"], unique=False)
    op.create_index("ix_prepaid_status_consumer", "prepaid_charges", ["status", "consumer"], unique=False)
    op.create_table(
        "settlement_batches",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("permission_digest", sa.String(length=66), nullable=True),
        sa.Column("expected_spent", sa.BigInteger(), nullable=True),
        sa.Column("reference", sa.String(length=66), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("submission_id", sa.String(length=100), nullable=True),
        sa.Column("tx_hash", sa.String(length=66), nullable=True),
        sa.Column("gas_used", sa.BigInteger(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("error", sa.String(length=300), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("reference"),
    )
    op.create_index(op.f("ix_settlement_batches_status"), "settlement_batches", ["status"], unique=False)
    op.create_index(op.f("ix_settlement_batches_tx_hash"), "settlement_batches", ["tx_hash"], unique=False)
    op.create_table(
        "spend_permissions",
        sa.Column("digest", sa.String(length=66), nullable=False),
        sa.Column("consumer", sa.String(length=42), nullable=False),
        sa.Column("spender", sa.String(length=42), nullable=False),
        sa.Column("allowance", sa.BigInteger(), nullable=False),
        sa.Column("valid_after", sa.BigInteger(), nullable=False),
        sa.Column("valid_until", sa.BigInteger(), nullable=False),
        sa.Column("salt", sa.String(length=66), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("digest"),
    )
    op.create_index(op.f("ix_spend_permissions_consumer"), "spend_permissions", ["consumer"], unique=False)
    op.create_table(
        "x402_payments",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("payer", sa.String(length=42), nullable=False),
        sa.Column("nonce", sa.String(length=66), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("valid_after", sa.BigInteger(), nullable=False),
        sa.Column("valid_before", sa.BigInteger(), nullable=False),
        sa.Column("signature", sa.String(length=132), nullable=False),
        sa.Column("listing_id", sa.String(length=40), nullable=False),
        sa.Column("provider", sa.String(length=42), nullable=False),
        sa.Column("call_id", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("batch_id", sa.BigInteger(), nullable=True),
        sa.Column("tx_hash", sa.String(length=66), nullable=True),
        sa.Column("error", sa.String(length=300), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("payer", "nonce", name="uq_x402_payer_nonce"),
    )
    op.create_index(op.f("ix_x402_payments_batch_id"), "x402_payments", ["batch_id"], unique=False)
    op.create_index("ix_x402_status_created", "x402_payments", ["status", "created_at"], unique=False)


def downgrade() -> None:
    for table in TABLES:
        op.drop_table(table)
