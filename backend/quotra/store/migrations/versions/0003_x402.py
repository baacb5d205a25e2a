"""x402: look up a payer's unsettled authorizations (the balance check on the paid-call path).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_x402_payer_status", "x402_payments", ["payer", "status"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_x402_payer_status", table_name="x402_payments")
