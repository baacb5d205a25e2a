"""Initial schema: listings, SIWE nonces, playground usage, calls.

Revision ID: 0001
Revises:
Create Date: 2025-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from quotra.store.models import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "listings",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(42), nullable=False, index=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("base_url", sa.String(2048)),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("api_key_sealed", sa.Text, nullable=False),
        sa.Column("price_per_call", sa.BigInteger, nullable=False),
        sa.Column("price_input_per_mtok", sa.BigInteger),
        sa.Column("price_output_per_mtok", sa.BigInteger),
        sa.Column("max_calls", sa.BigInteger),
        sa.Column("calls_used", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("max_input_chars", sa.Integer),
        sa.Column("max_input_tokens", sa.Integer),
        sa.Column("max_output_tokens", sa.Integer),
        sa.Column("rate_per_minute", sa.Integer),
        sa.Column("expires_at", UTCDateTime()),
        sa.Column("status", sa.String(16), nullable=False, server_default="active", index=True),
        sa.Column("failure_streak", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cooldown_until", UTCDateTime()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("calls_used >= 0", name="ck_listings_calls_used_nonnegative"),
        sa.CheckConstraint(
            "max_calls IS NULL OR calls_used <= max_calls", name="ck_listings_calls_within_max"
        ),
    )
    op.create_table(
        "siwe_nonces",
        sa.Column("nonce", sa.String(64), primary_key=True),
        sa.Column("expires_at", UTCDateTime(), nullable=False, index=True),
        sa.Column("used_at", UTCDateTime()),
    )
    op.create_table(
        "playground_usage",
        sa.Column(
            "listing_id", sa.String(40), sa.ForeignKey("listings.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("consumer", sa.String(128), primary_key=True),
        sa.Column("calls", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_table(
        "calls",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("listing_id", sa.String(40), nullable=False),
        sa.Column("consumer", sa.String(128), nullable=False),
        sa.Column("gate", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("cost_atomic", sa.BigInteger, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_calls_listing_created", "calls", ["listing_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_calls_listing_created", table_name="calls")
    op.drop_table("calls")
    op.drop_table("playground_usage")
    op.drop_table("siwe_nonces")
    op.drop_table("listings")
