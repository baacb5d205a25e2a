"""Repository tests, run on SQLite and (through tools/with-postgres.sh) on PostgreSQL: the
migrations (and the models agreeing with them), listings, the listing quota and playground calls
taken by the call store, nonces, cooldowns and key rewrapping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from quotra.calls.records import Refused
from quotra.calls.store import CallStore, Hold, Served
from quotra.config import master_key_id
from quotra.store.db import create_engine, head_revision, upgrade
from quotra.store.models import Base, utc_day, utcnow
from quotra.store.repositories import Store
from quotra.store.transactions import Transactions
from quotra.vault import Vault
from sqlalchemy import inspect, text

HEAD = head_revision()

OWNER = "0x" + "ab" * 20


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    engine = create_engine(db_url)
    await upgrade(engine)
    try:
        yield Store(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def calls(store: Store) -> AsyncIterator[CallStore]:
    transactions = Transactions(store.engine)
    try:
        yield CallStore(store.engine, transactions)
    finally:
        await transactions.close()


def hold(listing_id: str, payer: str = "key:sandbox") -> Hold:
    return Hold(payer, listing_id, OWNER, 0, utcnow() + timedelta(minutes=15))


async def taken(work: list[Coroutine[Any, Any, str]]) -> list[str]:
    """The call ids reserved; refusals must all be the listing's."""
    results = await asyncio.gather(*work, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            assert isinstance(result, Refused), result
    return [r for r in results if isinstance(r, str)]


async def make(store: Store, listing_id: str, **values: object):
    fields = dict(
        id=listing_id,
        owner=OWNER,
        kind="sandbox",
        base_url=None,
        models=["m1"],
        api_key_sealed="sealed",
        price_per_call=1000,
        price_input_per_mtok=None,
        price_output_per_mtok=None,
        max_calls=None,
        calls_used=0,
        max_input_chars=None,
        max_input_tokens=None,
        max_output_tokens=None,
        rate_per_minute=None,
        expires_at=None,
        status="active",
        failure_streak=0,
        cooldown_until=None,
    )
    fields.update(values)
    return await store.create_listing(**fields)


async def test_migrations_create_every_table_and_are_idempotent(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        await upgrade(engine)
        await upgrade(engine)  # at head already: nothing to do, no error
        async with engine.connect() as connection:
            tables = await connection.run_sync(lambda c: set(inspect(c).get_table_names()))
            version = (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
        assert version == HEAD
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
        assert {
            "listings", "siwe_nonces", "playground_usage", "calls", "x402_authorizations", "x402_payers",
            "consumer_accounts", "api_keys", "spend_permissions", "settlement_batches", "chain_cursors",
        } <= tables  # fmt: skip
        assert not {"x402_payments", "prepaid_charges", "ledger"} & tables  # replaced by the call core
    finally:
        await engine.dispose()


async def test_the_models_match_the_migrations(db_url: str) -> None:
    """What autogenerate would write after the last migration: nothing (tables, columns, types,
    nullability, indexes, unique constraints, foreign keys)."""
    engine = create_engine(db_url)
    try:
        await upgrade(engine)

        def compare(connection: Any) -> list[Any]:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))

        async with engine.connect() as connection:
            assert await connection.run_sync(compare) == []
    finally:
        await engine.dispose()


async def test_listing_roundtrip_keeps_types_and_utc(store: Store) -> None:
    expires = datetime(2099, 1, 2, 3, 4, 5, tzinfo=UTC)
    created = await make(store, "lst_a", models=["m1", "m2"], expires_at=expires, max_calls=5)
    loaded = await store.get_listing("lst_a")
    assert loaded == created
    assert loaded is not None and loaded.models == ("m1", "m2")
    assert loaded.expires_at == expires and loaded.expires_at.tzinfo is not None
    assert loaded.remaining_calls == 5
    assert await store.get_listing("lst_missing") is None


async def test_update_listing_changes_only_that_listing(store: Store) -> None:
    await make(store, "lst_a")
    await make(store, "lst_b")
    updated = await store.update_listing("lst_a", status="paused", price_per_call=2000)
    assert updated is not None and updated.status == "paused" and updated.price_per_call == 2000
    other = await store.get_listing("lst_b")
    assert other is not None and other.status == "active" and other.price_per_call == 1000
    assert await store.update_listing("lst_missing", status="paused") is None


async def test_search_filters_and_sorts(store: Store) -> None:
    await make(store, "lst_cheap", price_per_call=100, max_calls=2)
    await make(store, "lst_mid", price_per_call=500, models=["m2"])
    await make(store, "lst_dear", price_per_call=900_000, max_calls=1000)
    await make(store, "lst_paused", price_per_call=50, status="paused")
    await make(store, "lst_expired", price_per_call=60, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    ids = [r.id for r in await store.search_listings()]
    assert ids == ["lst_cheap", "lst_mid", "lst_dear"]
    assert [r.id for r in await store.search_listings(sort="-price")] == ["lst_dear", "lst_mid", "lst_cheap"]
    assert [r.id for r in await store.search_listings(model="m2")] == ["lst_mid"]
    assert [r.id for r in await store.search_listings(max_price=500)] == ["lst_cheap", "lst_mid"]
    assert [r.id for r in await store.search_listings(min_remaining=3)] == ["lst_mid", "lst_dear"]
    assert [r.id for r in await store.search_listings(sort="remaining")] == [
        "lst_cheap",
        "lst_dear",
        "lst_mid",
    ]
    assert {r.id for r in await store.search_listings(owner=OWNER, live_only=False)} == {
        "lst_cheap",
        "lst_mid",
        "lst_dear",
        "lst_paused",
        "lst_expired",
    }
    assert [r.id for r in await store.search_listings(limit=1, offset=1)] == ["lst_mid"]


async def test_calls_never_exceed_max_calls_under_concurrency(store: Store, calls: CallStore) -> None:
    await make(store, "lst_a", max_calls=7)
    ids = await taken([calls.reserve_open(hold("lst_a"), gate="sandbox") for _ in range(40)])
    assert len(ids) == 7
    listing = await store.get_listing("lst_a")
    assert listing is not None and listing.calls_used == 7 and listing.remaining_calls == 0
    assert await calls.void(ids[0], outcome="upstream_error")  # its call is given back
    assert not await calls.void(ids[0], outcome="upstream_error")  # once
    assert len(await taken([calls.reserve_open(hold("lst_a"), gate="sandbox") for _ in range(5)])) == 1
    assert await calls.finish(ids[1], amount=0, usage=Served("m1", False, 1, 1, 1))  # a finished one is kept
    listing = await store.get_listing("lst_a")
    assert listing is not None and listing.calls_used == 7


async def test_calls_are_refused_on_paused_and_expired_listings(store: Store, calls: CallStore) -> None:
    await make(store, "lst_paused", status="paused")
    await make(store, "lst_expiring", expires_at=datetime.now(UTC) + timedelta(seconds=30))
    await make(store, "lst_expired", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    for listing_id in ("lst_paused", "lst_expired"):
        with pytest.raises(Refused) as refused:
            await calls.reserve_open(hold(listing_id), gate="sandbox")
        assert refused.value.reason == "listing_unavailable"
        with pytest.raises(Refused):
            await calls.reserve_playground(hold(listing_id, "ip:1.2.3.4"), free_calls=3, daily_default=100)
    assert await calls.reserve_open(hold("lst_expiring"), gate="sandbox")
    for listing_id in ("lst_paused", "lst_expired"):
        listing = await store.get_listing(listing_id)
        assert listing is not None and listing.calls_used == 0
        assert await store.playground_calls(listing_id, "ip:1.2.3.4") == 0


async def test_playground_calls_are_counted_atomically_per_listing_and_consumer(
    store: Store, calls: CallStore
) -> None:
    await make(store, "lst_a")
    await make(store, "lst_b")

    def free(listing_id: str, consumer: str) -> Coroutine[Any, Any, str]:
        return calls.reserve_playground(hold(listing_id, consumer), free_calls=3, daily_default=100)

    ids = await taken([free("lst_a", "ip:1.2.3.4") for _ in range(20)])
    assert len(ids) == 3
    assert await store.playground_calls("lst_a", "ip:1.2.3.4") == 3
    listing = await store.get_listing("lst_a")
    assert listing is not None and listing.calls_used == 3  # a refused free call takes no quota
    assert await free("lst_b", "ip:1.2.3.4")  # other listing: own count
    assert await free("lst_a", "ip:5.6.7.8")  # other consumer: own count
    assert await calls.void(ids[0], outcome="upstream_error")  # a failed free call is given back
    assert await store.playground_calls("lst_a", "ip:1.2.3.4") == 2
    assert await free("lst_a", "ip:1.2.3.4")
    with pytest.raises(Refused) as refused:
        await free("lst_a", "ip:1.2.3.4")
    assert refused.value.reason == "free_calls_used"
    # A free call is settled at once and never charged, whatever its cost.
    assert await calls.finish(ids[1], amount=5_000, usage=Served("m1", True, 2, 3, 4, "cancelled"))
    call = await calls.get(ids[1])
    assert call is not None
    assert (call.gate, call.state, call.amount, call.charged, call.payer) == (
        "playground",
        "settled",
        0,
        False,
        "ip:1.2.3.4",
    )
    assert (call.model, call.stream, call.prompt_tokens, call.completion_tokens, call.outcome) == (
        "m1",
        True,
        2,
        3,
        "cancelled",
    )


async def test_a_listings_free_calls_a_day_are_shared_by_all_consumers(
    store: Store, calls: CallStore
) -> None:
    await make(store, "lst_own", free_calls_per_day=2)
    await make(store, "lst_default")  # the relay's default (here 3)
    await make(store, "lst_none", free_calls_per_day=0)

    def free(listing_id: str, consumer: str) -> Coroutine[Any, Any, str]:
        return calls.reserve_playground(hold(listing_id, consumer), free_calls=3, daily_default=3)

    # Ten fresh consumers (new wallets, new addresses) race for the listing's free calls.
    ids = await taken([free("lst_own", f"ip:10.0.0.{n}") for n in range(10)])
    assert len(ids) == 2
    listing = await store.get_listing("lst_own")
    assert listing is not None
    assert (listing.free_calls_today, listing.calls_used) == (2, 2)  # a refusal takes no quota
    assert listing.free_calls_left(utcnow(), 3) == 0
    with pytest.raises(Refused) as refused:
        await free("lst_own", "ip:10.0.0.99")
    assert refused.value.reason == "daily_free_calls_used"
    assert await calls.void(ids[0], outcome="upstream_error")  # a failed free call is given back
    assert await free("lst_own", "ip:10.0.0.99")

    assert len(await taken([free("lst_default", f"ip:10.0.1.{n}") for n in range(10)])) == 3
    with pytest.raises(Refused) as refused:
        await free("lst_none", "ip:10.0.0.1")
    assert refused.value.reason == "daily_free_calls_used"

    # A new UTC day starts the count again; a call of an earlier day, voided, gives nothing back.
    today = utc_day(utcnow())
    await store.update_listing("lst_own", free_calls_day=today - 1)
    assert await free("lst_own", "ip:10.0.2.1")
    listing = await store.get_listing("lst_own")
    assert listing is not None and (listing.free_calls_day, listing.free_calls_today) == (today, 1)
    await store.update_listing("lst_own", free_calls_day=today + 1)  # as if ids[1] were yesterday's
    assert await calls.void(ids[1], outcome="upstream_error")
    listing = await store.get_listing("lst_own")
    assert listing is not None and listing.free_calls_today == 1


async def test_count_calls_counts_the_calls_a_listing_served(store: Store, calls: CallStore) -> None:
    await make(store, "lst_a")
    ok, cancelled, voided, _open = [await calls.reserve_open(hold("lst_a"), gate="sandbox") for _ in range(4)]
    assert await calls.finish(ok, amount=10, usage=Served("m1", False, 1, 1, 1))
    assert await calls.finish(cancelled, amount=10, usage=Served("m1", True, 1, 1, 1, "cancelled"))
    assert await calls.void(voided, outcome="upstream_error")
    assert await store.count_calls("lst_a") == 2
    assert await store.count_calls("lst_a", "ok") == 1
    assert await store.count_calls("lst_a", "cancelled") == 1
    assert await store.count_calls("lst_a", "upstream_error") == 0  # voided: not served


async def test_nonce_is_single_use_even_when_raced(store: Store) -> None:
    now = datetime.now(UTC)
    await store.create_nonce("abcdef0123456789", now + timedelta(minutes=5))
    results = await asyncio.gather(*(store.consume_nonce("abcdef0123456789") for _ in range(10)))
    assert sum(results) == 1
    assert await store.consume_nonce("unknownnonce1234") is False
    await store.create_nonce("expired012345678", now + timedelta(seconds=1))
    assert await store.consume_nonce("expired012345678", now=now + timedelta(seconds=2)) is False


async def test_cooldown_after_repeated_failures_and_reset_on_success(store: Store) -> None:
    await make(store, "lst_a")
    cooldown = timedelta(seconds=60)
    assert await store.note_upstream_failure("lst_a", threshold=3, cooldown=cooldown) is False
    await store.note_upstream_success("lst_a")
    assert await store.note_upstream_failure("lst_a", threshold=3, cooldown=cooldown) is False
    assert await store.note_upstream_failure("lst_a", threshold=3, cooldown=cooldown) is False
    assert await store.note_upstream_failure("lst_a", threshold=3, cooldown=cooldown) is True
    listing = await store.get_listing("lst_a")
    assert listing is not None and listing.in_cooldown(datetime.now(UTC))


async def test_rewrap_keys_moves_every_listing_to_the_new_master_key(store: Store) -> None:
    old, new = Vault.from_key(b"\x01" * 32), Vault.from_key(b"\x02" * 32)
    for n in range(3):
        await make(store, f"lst_{n}", api_key_sealed=old.seal(f"lst_{n}", f"sk-secret-{n}"))
    ring = Vault(
        {master_key_id(b"\x01" * 32): b"\x01" * 32, master_key_id(b"\x02" * 32): b"\x02" * 32}, new.primary_id
    )
    assert await store.rewrap_keys(ring.rewrap) == 3
    for n in range(3):
        listing = await store.get_listing(f"lst_{n}")
        assert listing is not None
        assert new.open(listing.id, listing.api_key_sealed) == f"sk-secret-{n}"


async def test_app_analytics__the_per_user_query_runs_on_every_backend(store: Store) -> None:
    """PostgreSQL refuses a GROUP BY whose expression differs from the SELECT's (two bound "")."""
    from quotra.store.apps_repo import AppsStore, Totals

    start = datetime(2026, 1, 1, tzinfo=UTC)
    total, per_user = await AppsStore(store).analytics(
        "app_none", start, start + timedelta(days=1), sandbox=False
    )
    assert (total, per_user) == (Totals(0, 0, 0, 0, 0, 0), {})
