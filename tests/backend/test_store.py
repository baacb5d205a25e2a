"""Repository tests, run on SQLite and (through tools/with-postgres.sh) on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from quotra.config import master_key_id
from quotra.store.db import create_engine, upgrade
from quotra.store.repositories import Store
from quotra.vault import Vault
from sqlalchemy import inspect

OWNER = "0x" + "ab" * 20


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    engine = create_engine(db_url)
    await upgrade(engine)
    try:
        yield Store(engine)
    finally:
        await engine.dispose()


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
        assert {"listings", "siwe_nonces", "playground_usage", "calls", "alembic_version"} <= tables
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


async def test_reserve_call_never_exceeds_max_calls_under_concurrency(store: Store) -> None:
    await make(store, "lst_a", max_calls=7)
    results = await asyncio.gather(*(store.reserve_call("lst_a") for _ in range(40)))
    assert sum(results) == 7
    listing = await store.get_listing("lst_a")
    assert listing is not None and listing.calls_used == 7
    await store.release_call("lst_a")
    assert await store.reserve_call("lst_a") is True
    assert await store.reserve_call("lst_a") is False


async def test_reserve_call_refuses_paused_and_expired(store: Store) -> None:
    await make(store, "lst_paused", status="paused")
    await make(store, "lst_expired", expires_at=datetime.now(UTC) + timedelta(seconds=30))
    assert await store.reserve_call("lst_paused") is False
    assert await store.reserve_call("lst_expired") is True
    assert await store.reserve_call("lst_expired", now=datetime.now(UTC) + timedelta(minutes=1)) is False


async def test_playground_calls_are_counted_atomically_per_listing_and_consumer(store: Store) -> None:
    await make(store, "lst_a")
    await make(store, "lst_b")
    taken = await asyncio.gather(*(store.take_playground_call("lst_a", "ip:1.2.3.4", 3) for _ in range(20)))
    assert sum(taken) == 3
    assert await store.playground_calls("lst_a", "ip:1.2.3.4") == 3
    assert await store.take_playground_call("lst_b", "ip:1.2.3.4", 3) is True  # other listing: own count
    assert await store.take_playground_call("lst_a", "ip:5.6.7.8", 3) is True  # other consumer: own count
    await store.return_playground_call("lst_a", "ip:1.2.3.4")
    assert await store.take_playground_call("lst_a", "ip:1.2.3.4", 3) is True
    assert await store.take_playground_call("lst_a", "ip:1.2.3.4", 3) is False


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
