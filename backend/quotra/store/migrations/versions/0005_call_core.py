"""The call core: one `calls` table and one state machine for every gate.

Replaces `x402_payments`, `prepaid_charges`, the old `calls` records and the ledger: every call
(playground, x402, prepaid, sandbox) is one row of `calls` with its money; an x402 call's
authorization is one row of `x402_authorizations`; `x402_payers` holds each payer's balance as of
a known block. The old rows are carried over (x402 payments, prepaid charges, playground calls).

The relay must be drained first: no payment or charge in flight and no settlement batch open
(stop the relays, run `quotra settle --once` until `quotra reconcile` is clean). The upgrade
refuses to run otherwise, and cannot be undone: restore the backup taken before it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from quotra.store.models import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CALL_COLUMNS = (
    "id", "gate", "state", "listing_id", "provider", "payer", "key_id", "permission_digest", "model",
    "stream", "reserved", "amount", "fee", "prompt_tokens", "completion_tokens", "outcome", "duration_ms",
    "error", "expires_at", "batch_id", "tx_hash", "created_at", "updated_at",
)  # fmt: skip
IN_FLIGHT = {
    "x402_payments": "status IN ('reserved', 'captured', 'settling', 'reconciling')",
    "prepaid_charges": "status IN ('reserved', 'captured', 'settling')",
    "settlement_batches": "status IN ('pending', 'submitted')",
}


def _refuse_unless_drained() -> None:
    connection = op.get_bind()
    busy = {
        table: connection.execute(sa.text(f"SELECT COUNT(*) FROM {table} WHERE {where}")).scalar_one()  # noqa: S608
        for table, where in IN_FLIGHT.items()
    }
    busy = {table: count for table, count in busy.items() if count}
    if busy:
        raise RuntimeError(
            f"quotra 0005 (the call core) needs a drained relay; still in flight: {busy}. Stop the relays, "
            "run `quotra settle --once` until `quotra reconcile` is clean, then upgrade."
        )


def upgrade() -> None:
    _refuse_unless_drained()
    op.rename_table("calls", "calls_legacy")
    op.drop_index("ix_calls_listing_created", table_name="calls_legacy")
    op.create_table(
        "calls",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("gate", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("listing_id", sa.String(length=40), nullable=False),
        sa.Column("provider", sa.String(length=42), nullable=False),
        sa.Column("payer", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=True),
        sa.Column("permission_digest", sa.String(length=66), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("fee", sa.BigInteger(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(length=300), nullable=True),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("batch_id", sa.BigInteger(), nullable=True),
        sa.Column("tx_hash", sa.String(length=66), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_calls_state_expires", "calls", ["state", "expires_at"], unique=False)
    op.create_index("ix_calls_payer_created", "calls", ["payer", "created_at"], unique=False)
    op.create_index("ix_calls_listing_created", "calls", ["listing_id", "created_at"], unique=False)
    op.create_index(op.f("ix_calls_batch_id"), "calls", ["batch_id"], unique=False)
    op.create_table(
        "x402_authorizations",
        sa.Column("call_id", sa.String(length=32), nullable=False),
        sa.Column("payer", sa.String(length=42), nullable=False),
        sa.Column("nonce", sa.String(length=66), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("valid_after", sa.BigInteger(), nullable=False),
        sa.Column("valid_before", sa.BigInteger(), nullable=False),
        sa.Column("signature", sa.String(length=132), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("pending", sa.Boolean(), nullable=False),
        sa.Column("settled_block", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["call_id"], ["calls.id"]),
        sa.PrimaryKeyConstraint("call_id"),
    )
    op.create_index("ix_x402_payer_pending", "x402_authorizations", ["payer", "pending"], unique=False)
    op.create_table(
        "x402_payers",
        sa.Column("payer", sa.String(length=42), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("block", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("payer"),
    )
    _carry_over()
    op.drop_table("calls_legacy")
    op.drop_table("x402_payments")
    op.drop_table("prepaid_charges")
    op.drop_table("ledger")
    # Named like x402_payments' constraint, so created once that table is gone.
    with op.batch_alter_table("x402_authorizations") as batch:
        batch.create_unique_constraint("uq_x402_payer_nonce", ["payer", "nonce"])
    with op.batch_alter_table("settlement_batches") as batch:
        batch.drop_column("expected_spent")


def _ulid(created: datetime | str, seed: str) -> str:
    """A call id for a carried-over row: a ULID of its creation time (ids sort by time) whose
    random part is derived from its old id, so the migration is deterministic."""
    created_at = datetime.fromisoformat(created) if isinstance(created, str) else created
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    ms = int(created_at.timestamp() * 1000)
    value = (ms << 80) | int.from_bytes(hashlib.sha256(seed.encode()).digest()[:10], "big")
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(CROCKFORD[digit])
    return "call_" + "".join(reversed(chars))


def _carry_over() -> None:
    """Finished x402 payments, prepaid charges and playground calls become calls."""
    connection = op.get_bind()
    calls = sa.table(
        "calls",
        *(sa.column(name) for name in CALL_COLUMNS),
    )
    auths = sa.table(
        "x402_authorizations",
        *(
            sa.column(name)
            for name in (
                "call_id", "payer", "nonce", "value", "valid_after", "valid_before", "signature",
                "request_hash", "pending", "settled_block",
            )
        ),
    )  # fmt: skip
    base = {"key_id": None, "permission_digest": None, "fee": None, "duration_ms": None}
    rows, auth_rows = [], []
    # The fee each settlement was charged at lives only in the ledger (x402_<id>, prepaid_<id>).
    settled = "SELECT reference, fee FROM ledger WHERE kind IN ('settle', 'reconcile') AND fee IS NOT NULL"
    fees: dict[str, int] = {str(ref): int(fee) for ref, fee in connection.execute(sa.text(settled)).all()}
    for p in connection.execute(sa.text("SELECT * FROM x402_payments ORDER BY id")).mappings():
        call_id = _ulid(p["created_at"], f"x402:{p['id']}")
        voided = p["status"] == "voided"
        rows.append(
            base
            | {
                "id": call_id, "gate": "x402",
                "state": "settled" if p["status"] == "reconciled" else p["status"],
                "listing_id": p["listing_id"], "provider": p["provider"], "payer": p["payer"], "model": "",
                "stream": False, "reserved": p["amount"], "amount": 0 if voided else p["amount"],
                "prompt_tokens": 0, "completion_tokens": 0, "outcome": "error" if voided else "ok",
                "error": p["error"], "expires_at": p["created_at"], "batch_id": p["batch_id"],
                "tx_hash": p["tx_hash"], "created_at": p["created_at"], "updated_at": p["updated_at"],
                "fee": fees.get(f"x402_{p['id']}"),
            }
        )  # fmt: skip
        auth_rows.append(
            {
                "call_id": call_id, "payer": p["payer"], "nonce": p["nonce"], "value": p["amount"],
                "valid_after": p["valid_after"], "valid_before": p["valid_before"],
                "signature": p["signature"],
                "request_hash": "", "pending": False, "settled_block": None,
            }
        )  # fmt: skip
    charges = connection.execute(
        sa.text(
            "SELECT c.*, b.tx_hash AS batch_tx FROM prepaid_charges c "
            "LEFT JOIN settlement_batches b ON b.id = c.batch_id ORDER BY c.id"
        )
    ).mappings()
    states = {"released": "voided", "metered": "settled"}
    for c in charges:
        rows.append(
            base
            | {
                "id": _ulid(c["created_at"], f"prepaid:{c['id']}"),
                "gate": "sandbox" if c["status"] == "metered" else "prepaid",
                "state": states.get(c["status"], c["status"]), "listing_id": c["listing_id"],
                "provider": c["provider"], "payer": c["consumer"], "key_id": c["api_key_id"],
                "permission_digest": c["permission_digest"] or None, "model": c["model"], "stream": False,
                "reserved": c["reserved_amount"], "amount": c["amount"], "prompt_tokens": c["prompt_tokens"],
                "fee": fees.get(f"prepaid_{c['id']}"),
                "completion_tokens": c["completion_tokens"],
                "outcome": "error" if c["status"] == "released" else "ok", "error": None,
                "expires_at": c["created_at"], "batch_id": c["batch_id"], "tx_hash": c["batch_tx"],
                "created_at": c["created_at"], "updated_at": c["updated_at"],
            }
        )  # fmt: skip
    free = connection.execute(
        sa.text(
            "SELECT c.*, l.owner FROM calls_legacy c LEFT JOIN listings l ON l.id = c.listing_id "
            "WHERE c.gate = 'playground' ORDER BY c.id"
        )
    ).mappings()
    for c in free:
        rows.append(
            base
            | {
                "id": _ulid(c["created_at"], f"playground:{c['id']}"), "gate": "playground",
                "state": "settled",
                "listing_id": c["listing_id"], "provider": c["owner"] or "", "payer": c["consumer"],
                "model": c["model"], "stream": c["stream"], "reserved": 0, "amount": 0,
                "prompt_tokens": c["prompt_tokens"], "completion_tokens": c["completion_tokens"],
                "outcome": c["outcome"], "error": None, "expires_at": c["created_at"], "batch_id": None,
                "tx_hash": None, "created_at": c["created_at"], "updated_at": c["created_at"],
            }
        )  # fmt: skip
    if rows:
        connection.execute(calls.insert(), rows)
    if auth_rows:
        connection.execute(auths.insert(), auth_rows)


def downgrade() -> None:
    raise RuntimeError("0005 (the call core) cannot be undone: restore the backup taken before upgrading")
