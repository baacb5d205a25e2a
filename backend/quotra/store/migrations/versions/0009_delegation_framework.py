"""MetaMask's Delegation Framework: ERC-7710 claims and consumers' periodic allowances.

`claims.kind` tells a claim through the escrow's own `Delegation` (`escrow`) from one redeemed
through the framework's DelegationManager (`erc7710`), whose redemption (permission contexts,
executions, EIP-7702 authorizations) is kept in `claims.redemption` so that the poller can resend
exactly what was signed; `revocations.redemption` likewise keeps a `disableDelegation`
redemption. `allowances` holds each consumer's periodic USDC allowance to the relay
(an ERC-7715 `erc20-token-periodic` grant's permission context), which tops up its deposit.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from quotra.store.models import UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("claims") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="escrow"))
        batch.add_column(sa.Column("redemption", sa.Text(), nullable=True))
    with op.batch_alter_table("revocations") as batch:
        batch.add_column(sa.Column("redemption", sa.Text(), nullable=True))
    op.create_table(
        "allowances",
        sa.Column("hash", sa.String(length=66), nullable=False),
        sa.Column("wallet", sa.String(length=42), nullable=False),
        sa.Column("context", sa.Text(), nullable=False),
        sa.Column("period_amount", sa.BigInteger(), nullable=False),
        sa.Column("period_duration", sa.BigInteger(), nullable=False),
        sa.Column("start_date", sa.BigInteger(), nullable=False),
        sa.Column("expiry", sa.BigInteger(), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("last_top_up_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.String(length=300), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("hash"),
    )
    op.create_index(op.f("ix_allowances_wallet"), "allowances", ["wallet"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_allowances_wallet"), table_name="allowances")
    op.drop_table("allowances")
    with op.batch_alter_table("revocations") as batch:
        batch.drop_column("redemption")
    with op.batch_alter_table("claims") as batch:
        batch.drop_column("redemption")
        batch.drop_column("kind")
