"""ETH-free claims: provider delegations, claims, gasless revocations and processed relayer webhooks.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from quotra.store.models import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("webhook_events", "revocations", "claims", "delegations")


def upgrade() -> None:
    op.create_table(
        "delegations",
        sa.Column("digest", sa.String(length=66), nullable=False),
        sa.Column("provider", sa.String(length=42), nullable=False),
        sa.Column("delegate", sa.String(length=42), nullable=False),
        sa.Column("payee", sa.String(length=42), nullable=False),
        sa.Column("max_amount", sa.String(length=78), nullable=False),
        sa.Column("relayer_fee", sa.String(length=78), nullable=False),
        sa.Column("valid_until", sa.String(length=78), nullable=False),
        sa.Column("salt", sa.String(length=78), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("digest"),
    )
    op.create_index(op.f("ix_delegations_provider"), "delegations", ["provider"], unique=False)
    op.create_table(
        "claims",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("provider", sa.String(length=42), nullable=False),
        sa.Column("payee", sa.String(length=42), nullable=False),
        sa.Column("delegation_digest", sa.String(length=66), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("relayer_fee", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("relayer", sa.String(length=16), nullable=False),
        sa.Column("task_id", sa.String(length=100), nullable=True),
        sa.Column("tx_hash", sa.String(length=66), nullable=True),
        sa.Column("block_number", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.String(length=300), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_check_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_claims_provider"), "claims", ["provider"], unique=False)
    op.create_index(op.f("ix_claims_delegation_digest"), "claims", ["delegation_digest"], unique=False)
    op.create_index(op.f("ix_claims_task_id"), "claims", ["task_id"], unique=False)
    op.create_index("ix_claims_status_check", "claims", ["status", "next_check_at"], unique=False)
    op.create_table(
        "revocations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("account", sa.String(length=42), nullable=False),
        sa.Column("item", sa.String(length=66), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("relayer", sa.String(length=16), nullable=False),
        sa.Column("task_id", sa.String(length=100), nullable=True),
        sa.Column("tx_hash", sa.String(length=66), nullable=True),
        sa.Column("error", sa.String(length=300), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_check_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_revocations_account"), "revocations", ["account"], unique=False)
    op.create_index(op.f("ix_revocations_item"), "revocations", ["item"], unique=False)
    op.create_index(op.f("ix_revocations_task_id"), "revocations", ["task_id"], unique=False)
    op.create_table(
        "webhook_events",
        sa.Column("event_id", sa.String(length=256), nullable=False),
        sa.Column("type", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("task_id", sa.String(length=100), nullable=False),
        sa.Column("memo", sa.String(length=256), nullable=True),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", "type"),
    )


def downgrade() -> None:
    for table in TABLES:
        op.drop_table(table)
