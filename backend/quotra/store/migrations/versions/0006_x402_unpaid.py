"""x402 payers whose authorization did not pay: `x402_payers.unpaid`.

The x402 gate no longer asks USDC per call whether a nonce is still unused (see
`quotra.payments.x402_gate`); an authorization the chain refuses at settlement (its payer moved the
money or cancelled the nonce) or that was used outside the escrow counts against its payer, and a
payer with any is refused further x402 calls.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("x402_payers") as batch:
        batch.add_column(sa.Column("unpaid", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("x402_payers") as batch:
        batch.drop_column("unpaid")
