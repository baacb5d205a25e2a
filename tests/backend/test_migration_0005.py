"""Migration 0005 (the call core) on SQLite and (through tools/with-postgres.sh) PostgreSQL: a
database at revision 0004 holding finished x402 payments, prepaid charges, playground calls and
their ledger is upgraded to head; every finished call is carried over into `calls` (x402 ones with
their authorization, settled ones with the fee the ledger recorded) and the new code reads them as
it reads its own. An upgrade of a relay that was not drained is refused, naming what is in flight."""

from __future__ import annotations

import importlib.util
import re
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from eth_account import Account
from quotra.calls.outbox import Outbox
from quotra.calls.records import CALL_ID_PATTERN, CallView, Refused, X402Hold, summary
from quotra.calls.store import CallStore, Hold
from quotra.store.claims_repo import ClaimsRepo
from quotra.store.db import MIGRATIONS, create_engine, head_revision, upgrade
from quotra.store.models import Call, X402Authorization, table, utcnow
from quotra.store.repositories import Store
from quotra.store.transactions import Transactions
from sqlalchemy.ext.asyncio import AsyncEngine

HEAD = head_revision()

OWNER = Account.create().address
PAYER = Account.create().address
CONSUMER = Account.create().address
LISTING = "lst_old"
DIGEST = "0x" + "d1" * 32
T0 = datetime(2026, 11, 1, 12, 0, 0)  # naive UTC, as the old rows were stored
SIG = "0x" + "22" * 65
CALLS = table(Call)


def _migration() -> Any:
    spec = importlib.util.spec_from_file_location("m0005", MIGRATIONS / "versions" / "0005_call_core.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def nonce(n: int) -> str:
    return "0x" + f"{n:064x}"


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """A database at revision 0004, with one listing."""
    engine = create_engine(db_url)
    await upgrade(engine, "0004")
    listing = dict(
        id=LISTING, owner=OWNER, kind="sandbox", base_url=None, models=["m"], api_key_sealed="sealed",
        price_per_call=1_000, price_input_per_mtok=None, price_output_per_mtok=None, max_calls=None,
        calls_used=12, max_input_chars=None, max_input_tokens=None, max_output_tokens=None,
        rate_per_minute=None, expires_at=None, status="active", failure_streak=0, cooldown_until=None,
        created_at=T0, updated_at=T0,
    )  # fmt: skip
    await insert(engine, "listings", [listing])
    try:
        yield engine
    finally:
        await engine.dispose()


async def insert(engine: AsyncEngine, table: str, rows: list[dict[str, Any]]) -> None:
    """Rows into a table as revision 0004 has it (reflected: the models describe head)."""

    def work(connection: Any) -> None:
        connection.execute(sa.Table(table, sa.MetaData(), autoload_with=connection).insert(), rows)

    async with engine.begin() as connection:
        await connection.run_sync(work)


async def names(engine: AsyncEngine) -> tuple[set[str], set[str], str]:
    """The tables, the settlement batches' columns and the alembic revision."""

    def work(connection: Any) -> tuple[set[str], set[str], str]:
        inspector = sa.inspect(connection)
        columns = {c["name"] for c in inspector.get_columns("settlement_batches")}
        version = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        return set(inspector.get_table_names()), columns, version

    async with engine.connect() as connection:
        return await connection.run_sync(work)


def payment(n: int, status: str, amount: int, **values: Any) -> dict[str, Any]:
    return {
        "id": n, "payer": PAYER, "nonce": nonce(n), "amount": amount, "valid_after": 0,
        "valid_before": 2_000_000_000 + n, "signature": SIG, "listing_id": LISTING, "provider": OWNER,
        "call_id": None, "status": status, "batch_id": None, "tx_hash": None, "error": None,
        "created_at": at(n), "updated_at": at(n) + timedelta(seconds=30),
    } | values  # fmt: skip


def charge(n: int, status: str, amount: int, **values: Any) -> dict[str, Any]:
    return {
        "id": n, "consumer": CONSUMER, "api_key_id": "key_live", "permission_digest": DIGEST,
        "listing_id": LISTING, "provider": OWNER, "call_id": None, "reserved_amount": 5_000, "amount": amount,
        "prompt_tokens": 11, "completion_tokens": 22, "model": "sandbox-model", "status": status,
        "batch_id": None, "created_at": at(20 + n), "updated_at": at(20 + n) + timedelta(seconds=5),
    } | values  # fmt: skip


def ledger(
    n: int, kind: str, reference: str, amount: int, fee: int | None, method: str = "x402"
) -> dict[str, Any]:
    return {
        "id": n, "kind": kind, "method": method, "account": PAYER, "provider": OWNER, "listing_id": LISTING,
        "call_id": None, "amount": amount, "fee": fee, "reference": reference, "batch_id": None,
        "tx_hash": None, "created_at": at(40 + n),
    }  # fmt: skip


def batch_row(n: int, status: str, **values: Any) -> dict[str, Any]:
    return {
        "id": n, "kind": "x402", "status": status, "permission_digest": None, "expected_spent": None,
        "reference": "0x" + secrets.token_hex(32), "amount": 0, "items": 0, "submission_id": None,
        "tx_hash": None, "gas_used": None, "attempts": 1, "next_attempt_at": None, "error": None,
        "created_at": at(0), "updated_at": at(1),
    } | values  # fmt: skip


TX_X402 = "0x" + "a1" * 32
TX_CHARGES = "0x" + "c1" * 32
TX_RECONCILE = "0x" + "b2" * 32
TX_REFUND = "0x" + "e3" * 32


async def old_relay(engine: AsyncEngine) -> None:
    """What a drained relay at revision 0004 holds."""
    batch = {
        "status": "confirmed",
        "permission_digest": None,
        "expected_spent": None,
        "amount": 0,
        "items": 0,
    }
    batch |= {"submission_id": None, "gas_used": 1, "attempts": 1, "next_attempt_at": None, "error": None}
    await insert(
        engine,
        "settlement_batches",
        [
            batch_row(1, "confirmed", kind="x402", tx_hash=TX_X402),
            batch_row(
                2, "confirmed", kind="charges", tx_hash=TX_CHARGES, permission_digest=DIGEST, expected_spent=0
            ),
        ],
    )
    await insert(
        engine,
        "x402_payments",
        [
            payment(1, "settled", 1_000, batch_id=1, tx_hash=TX_X402),
            payment(2, "reconciled", 2_000, tx_hash=TX_RECONCILE, error="front-run"),
            payment(3, "voided", 3_000),
            payment(4, "failed", 4_000, batch_id=1, error="USDC refused the authorization"),
            payment(5, "refunded", 5_000, batch_id=1, tx_hash=TX_REFUND),
        ],
    )
    await insert(
        engine,
        "prepaid_charges",
        [
            charge(1, "settled", 1_500, batch_id=2),
            charge(2, "released", 0),
            charge(3, "metered", 700, api_key_id="key_sandbox", permission_digest=""),
            charge(4, "failed", 900, batch_id=2),
        ],
    )
    legacy = {"listing_id": LISTING, "model": "sandbox-model", "cost_atomic": 1_000}
    await insert(
        engine,
        "calls",
        [
            legacy
            | {
                "id": 1,
                "consumer": "ip:203.0.113.7",
                "gate": "playground",
                "outcome": "cancelled",
                "stream": True,
            }
            | {"prompt_tokens": 5, "completion_tokens": 6, "created_at": at(30)},
            legacy
            | {"id": 2, "consumer": PAYER, "gate": "x402", "outcome": "ok", "stream": False}
            | {"prompt_tokens": 1, "completion_tokens": 2, "created_at": at(31)},
        ],
    )
    await insert(
        engine,
        "ledger",
        [
            ledger(1, "capture", "x402_1", 1_000, None),
            ledger(2, "settle", "x402_1", 1_000, 100),
            ledger(3, "reconcile", "x402_2", 2_000, 200),
            ledger(4, "settle", "x402_5", 5_000, 500),
            ledger(5, "refund", "x402_5", 5_000, 500),
            ledger(6, "settle", "prepaid_1", 1_500, 150, "prepaid"),
            ledger(7, "deposit", "deposit:0x01", 9_000, None, "chain"),
        ],
    )


async def test_finished_calls_are_carried_over(engine: AsyncEngine) -> None:
    await old_relay(engine)
    await upgrade(engine)
    tables, batch_columns, version = await names(engine)
    assert version == HEAD
    assert {"calls", "x402_authorizations", "x402_payers"} <= tables
    assert not {"x402_payments", "prepaid_charges", "ledger", "calls_legacy"} & tables
    assert "expected_spent" not in batch_columns

    async with engine.connect() as connection:
        calls = [CallView.of(r) for r in await connection.execute(sa.select(CALLS).order_by(CALLS.c.id))]
        auths = {r.call_id: r for r in await connection.execute(sa.select(table(X402Authorization)))}
    # Ids are call ids of each row's creation time, derived from its old id (deterministic).
    ulid = _migration()._ulid
    origin = {
        **{ulid(at(n), f"x402:{n}"): ("x402", n) for n in range(1, 6)},
        **{ulid(at(20 + n), f"prepaid:{n}"): ("prepaid", n) for n in range(1, 5)},
        ulid(at(30), "playground:1"): ("playground", 1),
    }
    assert sorted(c.id for c in calls) == sorted(origin)  # the old x402 call record is not a call
    assert all(re.fullmatch(CALL_ID_PATTERN, c.id) for c in calls)
    assert [c.id for c in calls] == [c.id for c in sorted(calls, key=lambda c: c.created_at)]
    by = {origin[c.id]: c for c in calls}

    def shape(call: CallView) -> tuple[Any, ...]:
        return (call.gate, call.state, call.reserved, call.amount, call.fee, call.outcome, call.tx_hash)

    assert shape(by["x402", 1]) == ("x402", "settled", 1_000, 1_000, 100, "ok", TX_X402)
    assert shape(by["x402", 2]) == ("x402", "settled", 2_000, 2_000, 200, "ok", TX_RECONCILE)
    assert shape(by["x402", 3]) == ("x402", "voided", 3_000, 0, None, "error", None)
    assert shape(by["x402", 4]) == ("x402", "failed", 4_000, 4_000, None, "ok", None)
    assert shape(by["x402", 5]) == ("x402", "refunded", 5_000, 5_000, 500, "ok", TX_REFUND)
    assert shape(by["prepaid", 1]) == ("prepaid", "settled", 5_000, 1_500, 150, "ok", TX_CHARGES)
    assert shape(by["prepaid", 2]) == ("prepaid", "voided", 5_000, 0, None, "error", None)
    assert shape(by["prepaid", 3]) == ("sandbox", "settled", 5_000, 700, None, "ok", None)
    assert shape(by["prepaid", 4]) == ("prepaid", "failed", 5_000, 900, None, "ok", TX_CHARGES)
    assert shape(by["playground", 1]) == ("playground", "settled", 0, 0, None, "cancelled", None)

    x402 = by["x402", 1]
    assert (x402.payer, x402.provider, x402.listing_id, x402.batch_id, x402.key_id) == (
        PAYER,
        OWNER,
        LISTING,
        1,
        None,
    )
    assert (x402.created_at, x402.updated_at) == (
        at(1).replace(tzinfo=UTC),
        at(1).replace(tzinfo=UTC) + timedelta(seconds=30),
    )
    assert by["x402", 2].error == "front-run" and by["x402", 4].error == "USDC refused the authorization"
    prepaid = by["prepaid", 1]
    assert (prepaid.payer, prepaid.key_id, prepaid.permission_digest, prepaid.batch_id) == (
        CONSUMER,
        "key_live",
        DIGEST,
        2,
    )
    assert (prepaid.model, prepaid.prompt_tokens, prepaid.completion_tokens) == ("sandbox-model", 11, 22)
    assert (by["prepaid", 3].key_id, by["prepaid", 3].permission_digest) == ("key_sandbox", None)
    free = by["playground", 1]
    assert (
        free.payer,
        free.provider,
        free.model,
        free.stream,
        free.prompt_tokens,
        free.completion_tokens,
    ) == (
        "ip:203.0.113.7",
        OWNER,
        "sandbox-model",
        True,
        5,
        6,
    )
    # Every x402 call has its authorization, held against nothing (the relay was drained).
    assert set(auths) == {by["x402", n].id for n in range(1, 6)}
    for n in range(1, 6):
        auth = auths[by["x402", n].id]
        assert (auth.payer, auth.nonce, auth.value, auth.valid_before, auth.signature) == (
            PAYER,
            nonce(n),
            by["x402", n].reserved,
            2_000_000_000 + n,
            SIG,
        )
        assert not auth.pending and auth.settled_block is None

    # The new code reads them as its own.
    transactions = Transactions(engine)
    try:
        store, calls_store, outbox = (
            Store(engine),
            CallStore(engine, transactions),
            Outbox(engine, transactions),
        )
        mine = await calls_store.of_payer((PAYER,), limit=10)
        assert [c.id for c in mine] == [by["x402", n].id for n in (5, 4, 3, 2, 1)]
        assert summary(by["x402", 1])["charged"] is True and summary(by["x402", 4])["charged"] is False
        found = await outbox.find_x402_many([(PAYER, nonce(2))])
        assert [(f.call_id, f.state) for f in found.values()] == [(by["x402", 2].id, "settled")]
        # Each provider's books: what its settled calls add up to, with the fees the escrow took.
        assert await outbox.credited_by_provider() == {OWNER: (1_000 + 2_000 + 1_500, 100 + 200 + 150)}
        assert await ClaimsRepo(store).listing_earnings(OWNER) == {LISTING: 900 + 1_800 + 1_350}
        assert await store.count_calls(LISTING) == 8  # served: all but the two voided
        # A carried-over authorization that paid never pays again; a voided one still may.
        hold = Hold(PAYER, LISTING, OWNER, 1_000, utcnow() + timedelta(minutes=15))

        def x402(n: int) -> X402Hold:
            return X402Hold(PAYER, nonce(n), 1_000, 0, 2_000_000_000, SIG, "ab" * 32, 10**9, 1)

        with pytest.raises(Refused) as refused:
            await calls_store.reserve_x402(hold, x402(1))
        assert refused.value.reason == "nonce_used" and refused.value.call is not None
        assert refused.value.call.id == by["x402", 1].id
        again = await calls_store.reserve_x402(hold, x402(3))
        assert again not in origin and (await calls_store.by_authorization(PAYER, nonce(3))).id == again  # type: ignore[union-attr]
        fresh = await calls_store.reserve_x402(hold, x402(99))
        assert fresh > max(origin)  # new ids sort after the carried-over ones
        assert await outbox.stranded(utcnow().timestamp()) == []
    finally:
        await transactions.close()


async def test_an_empty_database_upgrades_too(engine: AsyncEngine) -> None:
    await upgrade(engine)
    tables, _, version = await names(engine)
    assert version == HEAD and "x402_authorizations" in tables
    async with engine.connect() as connection:
        assert (await connection.execute(sa.text("SELECT COUNT(*) FROM calls"))).scalar_one() == 0


IN_FLIGHT = [
    ("x402_payments", "reserved"),
    ("x402_payments", "captured"),
    ("x402_payments", "settling"),
    ("x402_payments", "reconciling"),
    ("prepaid_charges", "reserved"),
    ("prepaid_charges", "captured"),
    ("prepaid_charges", "settling"),
    ("settlement_batches", "pending"),
    ("settlement_batches", "submitted"),
]


@pytest.mark.parametrize(("table", "status"), IN_FLIGHT, ids=[f"{t}-{s}" for t, s in IN_FLIGHT])
async def test_a_relay_not_drained_is_refused(engine: AsyncEngine, table: str, status: str) -> None:
    await old_relay(engine)
    if table == "x402_payments":
        await insert(engine, table, [payment(9, status, 9_000, nonce=nonce(9))])
    elif table == "prepaid_charges":
        await insert(engine, table, [charge(9, status, 900)])
    else:
        await insert(engine, table, [batch_row(9, status, kind="x402", amount=9_000, items=1, attempts=0)])
    with pytest.raises(RuntimeError) as refused:
        await upgrade(engine)
    message = str(refused.value)
    assert f"'{table}': 1" in message and "drained" in message and "quotra settle --once" in message
    # Nothing changed: still at 0004 with every old row.
    tables, batch_columns, version = await names(engine)
    assert version == "0004" and "expected_spent" in batch_columns
    assert {"x402_payments", "prepaid_charges", "ledger"} <= tables and "x402_authorizations" not in tables
    async with engine.connect() as connection:
        assert (await connection.execute(sa.text(f"SELECT COUNT(*) FROM {table}"))).scalar_one() >= 1
        assert (await connection.execute(sa.text("SELECT COUNT(*) FROM ledger"))).scalar_one() == 7
    # Drained (settled), it upgrades.
    async with engine.begin() as connection:
        final = "confirmed" if table == "settlement_batches" else "settled"
        await connection.execute(sa.text(f"UPDATE {table} SET status = :s WHERE id = 9"), {"s": final})
    await upgrade(engine)
    assert (await names(engine))[2] == HEAD
