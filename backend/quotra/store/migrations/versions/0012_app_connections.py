"""A wallet connected to several apps at once: each end user it connected keeps the permission it
signed for that app (`app_users.permission_digest`), and each such permission its own budget
(`spend_permissions.spent`, `reserved`, `unsettled`), as the escrow keeps one per digest.

A connection made before this revision made its permission the wallet's active one: it is kept,
under that permission, whose budget starts from the account's mirror of it.

Revision ID: 0012
Revises: 0009
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("spend_permissions") as batch:
        batch.add_column(sa.Column("spent", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("reserved", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("unsettled", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("app_users") as batch:
        batch.add_column(sa.Column("permission_digest", sa.String(length=66), nullable=True))
        batch.create_index("ix_app_users_permission_digest", ["permission_digest"], unique=False)
    op.execute(
        "UPDATE app_users SET permission_digest = (SELECT a.permission_digest FROM consumer_accounts a "
        "WHERE a.wallet = app_users.wallet) WHERE wallet IS NOT NULL"
    )
    op.execute(
        "UPDATE spend_permissions SET spent = (SELECT a.permission_spent FROM consumer_accounts a "
        "WHERE a.permission_digest = spend_permissions.digest) "
        "WHERE digest IN (SELECT permission_digest FROM consumer_accounts "
        "WHERE permission_digest IS NOT NULL)"
    )
    # A connection whose wallet has no active permission any more cannot pay: hosted again.
    op.execute("UPDATE app_users SET wallet = NULL WHERE wallet IS NOT NULL AND permission_digest IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("app_users") as batch:
        batch.drop_index("ix_app_users_permission_digest")
        batch.drop_column("permission_digest")
    with op.batch_alter_table("spend_permissions") as batch:
        batch.drop_column("unsettled")
        batch.drop_column("reserved")
        batch.drop_column("spent")
