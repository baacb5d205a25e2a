"""Apps and their billing: apps with a markup, app keys, end users with grants and spend limits (or
their own wallet), grants, the markup and grant part of each call, spend permissions that name a
developer, and rate limits shared by every replica.

Spend permissions gain `developer` and `max_markup_bps` (the escrow's `SpendPermission` now signs
them): the rows kept from before name no developer and allow no markup, which is what they meant,
but they were signed under the former type and settle only on the escrow they were signed for.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"


def upgrade() -> None:
    op.create_table(
        "apps",
        sa.Column("id", sa.String(length=40), primary_key=True),
        sa.Column("owner", sa.String(length=42), nullable=False, index=True),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("markup_bps", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "app_users",
        sa.Column("app_id", sa.String(length=40), sa.ForeignKey("apps.id"), primary_key=True),
        sa.Column("external_id", sa.String(length=128), primary_key=True),
        sa.Column("wallet", sa.String(length=42), nullable=True),
        sa.Column("spend_limit", sa.BigInteger(), nullable=True),
        sa.Column("spent", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("reserved", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("granted", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("grant_used", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("reserved >= 0", name="ck_app_users_reserved_nonnegative"),
        sa.CheckConstraint("grant_used <= granted", name="ck_app_users_grant_within"),
    )
    op.create_table(
        "grants",
        sa.Column("id", sa.String(length=40), primary_key=True),
        sa.Column("app_id", sa.String(length=40), sa.ForeignKey("apps.id"), nullable=False),
        sa.Column("external_user_id", sa.String(length=128), nullable=True),
        sa.Column("wallet", sa.String(length=42), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("description", sa.String(length=300), nullable=False, server_default=""),
        sa.Column("tx_hash", sa.String(length=66), nullable=True, unique=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Index("ix_grants_app_created", "app_id", "created_at"),
    )
    op.create_table(
        "rate_limits",
        sa.Column("key", sa.String(length=200), primary_key=True),
        sa.Column("tat", sa.BigInteger(), nullable=False),
    )
    with op.batch_alter_table("calls") as batch:
        batch.add_column(sa.Column("app_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("end_user", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("markup", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("granted", sa.BigInteger(), nullable=False, server_default="0"))
        batch.create_index("ix_calls_app_created", ["app_id", "created_at"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("app_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("rate_per_minute", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("rate_tat", sa.BigInteger(), nullable=False, server_default="0"))
        batch.create_index("ix_api_keys_app_id", ["app_id"])
    with op.batch_alter_table("spend_permissions") as batch:
        batch.add_column(
            sa.Column("developer", sa.String(length=42), nullable=False, server_default=ZERO_ADDRESS)
        )
        batch.add_column(sa.Column("max_markup_bps", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("spend_permissions") as batch:
        batch.drop_column("max_markup_bps")
        batch.drop_column("developer")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_index("ix_api_keys_app_id")
        batch.drop_column("rate_tat")
        batch.drop_column("rate_per_minute")
        batch.drop_column("app_id")
    with op.batch_alter_table("calls") as batch:
        batch.drop_index("ix_calls_app_created")
        batch.drop_column("granted")
        batch.drop_column("markup")
        batch.drop_column("end_user")
        batch.drop_column("app_id")
    op.drop_table("rate_limits")
    op.drop_table("grants")
    op.drop_table("app_users")
    op.drop_table("apps")
