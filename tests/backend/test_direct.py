"""The call path's statements run on the driver's cursor (`quotra.store.direct`) do what
SQLAlchemy does with them, on SQLite (through the writer thread) and PostgreSQL: the same rows,
row counts, type conversions, Python-side defaults and `onupdate` values, and the same exceptions,
after which the transaction goes on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from quotra.store.db import create_engine, upgrade
from quotra.store.direct import Direct, prepared
from quotra.store.models import Call, Listing, table, utcnow
from quotra.store.repositories import Store
from quotra.store.transactions import Transactions
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

LISTINGS = table(Listing)
CALLS = table(Call)
WHEN = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)

_TOUCH = update(LISTINGS).where(LISTINGS.c.id == bindparam("b_id"), LISTINGS.c.status == "active")
_TOUCH_LISTING = prepared(_TOUCH.values(calls_used=LISTINGS.c.calls_used + 1))
_SAME_BY_SQLALCHEMY = _TOUCH.values(calls_used=LISTINGS.c.calls_used + 1)
_INSERT_CALL = prepared(insert(CALLS))
_COLUMNS = (CALLS.c.id, CALLS.c.stream, CALLS.c.expires_at, CALLS.c.reserved)
_CALL = prepared(select(*_COLUMNS).where(CALLS.c.id == bindparam("b_id")))
_CAPTURE = prepared(
    update(CALLS)
    .where(CALLS.c.id == bindparam("b_id"), CALLS.c.state == "reserved")
    .values(state="captured", stream=bindparam("b_stream"))
    .returning(CALLS.c.id, CALLS.c.stream, CALLS.c.updated_at)
)
_EXPANDING = prepared(select(CALLS.c.id).where(CALLS.c.state.in_(("a", "b"))))


def call_row(call_id: str) -> dict[str, object]:
    return {
        "id": call_id, "gate": "prepaid", "state": "reserved", "listing_id": "lst_1", "provider": "0x1",
        "payer": "0x2", "model": "", "stream": False, "reserved": 2**40, "amount": 0, "markup": 0,
        "granted": 0, "prompt_tokens": 0, "completion_tokens": 0, "expires_at": WHEN, "created_at": WHEN,
        "updated_at": WHEN,
    }  # fmt: skip


@pytest.fixture
async def transactions(db_url: str) -> AsyncIterator[Transactions]:
    engine = create_engine(db_url)
    await upgrade(engine)
    await Store(engine).create_listing(
        id="lst_1", owner="0x1", kind="sandbox", base_url=None, models=["m"], api_key_sealed="sealed",
        price_per_call=1, price_input_per_mtok=None, price_output_per_mtok=None, max_calls=None,
        calls_used=0, max_input_chars=None, max_input_tokens=None, max_output_tokens=None,
        rate_per_minute=None, expires_at=None, status="active", failure_streak=0, cooldown_until=None,
    )  # fmt: skip
    runner = Transactions(engine)
    try:
        yield runner
    finally:
        await runner.close()
        await engine.dispose()


async def test_rows_counts_and_types_as_sqlalchemy_gives_them(transactions: Transactions) -> None:
    def work(connection: Connection) -> tuple[object, ...]:
        assert isinstance(connection, Direct)
        connection.execute(_INSERT_CALL, call_row("call_1"))
        direct = connection.execute(_CALL, {"b_id": "call_1"}).one()
        by_sqlalchemy = connection.connection.execute(_CALL, {"b_id": "call_1"}).one()
        captured = connection.execute(_CAPTURE, {"b_id": "call_1", "b_stream": True})
        again = connection.execute(_CAPTURE, {"b_id": "call_1", "b_stream": True})
        first = captured.first()
        return tuple(direct), tuple(by_sqlalchemy), direct.expires_at, captured.rowcount, first, again

    direct, by_sqlalchemy, expires_at, captured_count, captured, again = await transactions.run(work)
    assert direct == by_sqlalchemy == ("call_1", False, WHEN, 2**40)
    assert expires_at == WHEN and expires_at.tzinfo is not None  # the UTC column's conversion applied
    assert captured_count == 1
    assert captured is not None and captured.id == "call_1" and captured.stream is True
    assert captured.updated_at == WHEN  # no onupdate on calls: what was stored
    assert again.rowcount == 0 and again.first() is None  # no longer reserved: nothing returned


async def test_literals_and_onupdate_functions_are_bound(transactions: Transactions) -> None:
    def work(connection: Connection) -> tuple[int, int, int, datetime]:
        touched = connection.execute(_TOUCH_LISTING, {"b_id": "lst_1"}).rowcount
        unknown = connection.execute(_TOUCH_LISTING, {"b_id": "lst_2"}).rowcount
        by_sqlalchemy = connection.connection.execute(_SAME_BY_SQLALCHEMY, {"b_id": "lst_1"}).rowcount
        row = connection.execute(select(LISTINGS.c.calls_used, LISTINGS.c.updated_at)).one()
        return touched, unknown, by_sqlalchemy * row.calls_used, row.updated_at

    before = utcnow()
    touched, unknown, calls_used, updated_at = await transactions.run(work)
    assert (touched, unknown, calls_used) == (1, 0, 2)  # `status == "active"` bound from the statement
    assert before <= updated_at <= utcnow() + timedelta(seconds=1)  # `onupdate=utcnow` applied


async def test_a_driver_error_is_sqlalchemys_and_the_transaction_goes_on(transactions: Transactions) -> None:
    def work(connection: Connection) -> int:
        connection.execute(_INSERT_CALL, call_row("call_1"))
        nested = connection.begin_nested()
        with pytest.raises(IntegrityError):
            connection.execute(_INSERT_CALL, call_row("call_1"))
        nested.rollback()
        connection.execute(_INSERT_CALL, call_row("call_2"))
        return len(connection.execute(select(CALLS.c.id)).all())

    assert await transactions.run(work) == 2


async def test_an_expanding_in_is_refused_when_compiled(transactions: Transactions) -> None:
    def work(connection: Connection) -> None:
        connection.execute(_EXPANDING, {})

    with pytest.raises(ValueError, match="not a statement to run directly"):
        await transactions.run(work)


async def test_a_savepoint_rolls_back_only_what_ran_inside_it(transactions: Transactions) -> None:
    def work(connection: Connection) -> list[str]:
        assert isinstance(connection, Direct)
        connection.execute(_INSERT_CALL, call_row("call_1"))
        with pytest.raises(IntegrityError), connection.savepoint():
            connection.execute(_INSERT_CALL, call_row("call_2"))
            connection.execute(_INSERT_CALL, call_row("call_1"))  # the driver's error closed the cursor
        with connection.savepoint():
            connection.execute(_INSERT_CALL, call_row("call_3"))
        return sorted(connection.execute(select(CALLS.c.id)).scalars())

    assert await transactions.run(work) == ["call_1", "call_3"]
