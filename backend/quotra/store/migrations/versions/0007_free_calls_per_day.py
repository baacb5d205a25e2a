"""A listing's daily budget of free playground calls, shared by all its consumers.

`free_calls_per_day` is the provider's choice (NULL: the relay's default,
`QUOTRA_PLAYGROUND_FREE_CALLS_PER_DAY`; 0: no free calls); `free_calls_today` counts the free
calls taken on UTC day `free_calls_day` (days since 1970-01-01), and starts again on a new day.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("listings") as batch:
        batch.add_column(sa.Column("free_calls_per_day", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("free_calls_day", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("free_calls_today", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("listings") as batch:
        batch.drop_column("free_calls_today")
        batch.drop_column("free_calls_day")
        batch.drop_column("free_calls_per_day")
