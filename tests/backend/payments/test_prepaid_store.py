"""The prepaid store's conditional updates, on SQLite and (through tools/with-postgres.sh) PostgreSQL:
exact counters, all-or-nothing reservations, no overspending under concurrency, and the
compare-and-set refresh of the chain mirror."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from eth_account import Account
from quotra.store.db import create_engine, upgrade
from quotra.store.models import ConsumerAccount, LedgerEntry, utcnow
from quotra.store.prepaid_repo import AccountView, KeyRef, PermissionView, PrepaidStore, Refused, hash_key
from quotra.store.repositories import Store
from sqlalchemy import select, update

PROVIDER = "0x" + "ab" * 20
NOW = int(time.time())
MARGIN = 600


@pytest.fixture
async def repo(db_url: str) -> AsyncIterator[PrepaidStore]:
    engine = create_engine(db_url)
    await upgrade(engine)
    try:
        yield PrepaidStore(Store(engine))
    finally:
        await engine.dispose()


async def funded(
    repo: PrepaidStore,
    *,
    deposit: int,
    allowance: int,
    spent: int = 0,
    pending: int = 0,
    cap: int | None = None,
    mode: str = "live",
    valid_until: int = NOW + 86_400,
) -> KeyRef:
    wallet = Account.create().address
    digest = "0x" + hash_key(wallet)
    await repo.activate_permission(
        PermissionView(
            digest, wallet, PROVIDER, allowance, NOW - 60, valid_until, "0x" + "00" * 32, "0x", None
        ),
        spent,
    )
    seen = await repo.get_account(wallet)
    assert seen is not None
    assert await repo.sync_account(
        wallet, seen=seen, deposit=deposit, pending_withdrawal=pending, permission_spent=spent
    )
    key_id = "key_" + hash_key(wallet)[:16]
    await repo.create_key(
        key_id=key_id,
        secret_hash=hash_key(key_id),
        wallet=wallet,
        name="",
        mode=mode,
        spend_cap=cap,  # type: ignore[arg-type]
    )
    ref = await repo.key_by_hash(hash_key(key_id))
    assert ref is not None
    return ref


async def reserve(repo: PrepaidStore, key: KeyRef, amount: int, now: int = NOW):
    return await repo.reserve(
        key, listing_id="lst_1", provider=PROVIDER, amount=amount, now_ts=now, margin=MARGIN
    )


async def account(repo: PrepaidStore, key: KeyRef) -> AccountView:
    view = await repo.get_account(key.wallet)
    assert view is not None
    return view


async def ledger(repo: PrepaidStore, wallet: str) -> list[tuple[str, int]]:
    async with repo.sessions() as session:
        rows = await session.scalars(
            select(LedgerEntry).where(LedgerEntry.account == wallet).order_by(LedgerEntry.id)
        )
        return [(e.kind, e.amount) for e in rows]


async def test_reserve_capture_release__exact_counters_and_ledger(repo: PrepaidStore) -> None:
    key = await funded(repo, deposit=10_000, allowance=8_000, cap=9_000)
    first = await reserve(repo, key, 3_000)
    second = await reserve(repo, key, 2_000)
    view = await account(repo, key)
    assert (view.reserved, view.unsettled, view.available) == (5_000, 0, 3_000)
    assert await repo.capture(first, 1_200, model="m", prompt_tokens=3, completion_tokens=4) == 1_200
    assert await repo.release(second) is True
    view = await account(repo, key)
    assert (view.reserved, view.unsettled, view.available) == (0, 1_200, 6_800)
    (state,) = await repo.list_keys(key.wallet)
    assert (state.spent, state.reserved, state.remaining) == (1_200, 0, 7_800)
    assert await ledger(repo, key.wallet) == [
        ("reserve", 3_000),
        ("reserve", 2_000),
        ("capture", 1_200),
        ("release", 2_000),
    ]
    # Finalising twice changes nothing.
    assert await repo.capture(first, 1_000) == 0
    assert await repo.release(first) is False
    assert await repo.release(second) is False
    assert (await account(repo, key)).unsettled == 1_200
    assert len(await ledger(repo, key.wallet)) == 4


async def test_capture__clamped_to_the_reservation__zero_cost_releases(repo: PrepaidStore) -> None:
    key = await funded(repo, deposit=10_000, allowance=10_000)
    over, free = await reserve(repo, key, 1_000), await reserve(repo, key, 1_000)
    assert await repo.capture(over, 5_000) == 1_000
    assert await repo.capture(free, 0) == 0
    (first, second) = await repo.usage(key.wallet, limit=10)
    assert (second.status, second.amount, first.status, first.amount) == ("captured", 1_000, "released", 0)
    assert (await account(repo, key)).unsettled == 1_000


@pytest.mark.parametrize(
    ("setup", "amount", "shortfall"),
    [
        ({"deposit": 999, "allowance": 5_000}, 1_000, "deposit"),
        ({"deposit": 5_000, "allowance": 999}, 1_000, "permission"),
        ({"deposit": 5_000, "allowance": 3_000, "spent": 2_001}, 1_000, "permission"),
        ({"deposit": 2_000, "allowance": 5_000, "pending": 1_001}, 1_000, "deposit"),
        ({"deposit": 5_000, "allowance": 5_000, "cap": 999}, 1_000, "key_cap"),
        ({"deposit": 5_000, "allowance": 5_000, "valid_until": NOW + MARGIN}, 1_000, "no_permission"),
        ({"deposit": 5_000, "allowance": 5_000, "valid_until": NOW - 1}, 1_000, "no_permission"),
    ],
    ids=["deposit", "allowance", "spent", "pending-withdrawal", "key-cap", "expiring", "expired"],
)
async def test_reserve__refused__names_the_short_limit__nothing_written(
    repo: PrepaidStore, setup: dict[str, int], amount: int, shortfall: str
) -> None:
    key = await funded(repo, **setup)  # type: ignore[arg-type]
    with pytest.raises(Refused) as refused:
        await reserve(repo, key, amount)
    assert refused.value.shortfall == shortfall
    view = await account(repo, key)
    assert view.reserved == 0
    assert (await repo.list_keys(key.wallet))[0].reserved == 0
    assert await repo.usage(key.wallet, limit=5) == [] and await ledger(repo, key.wallet) == []
    if shortfall != "no_permission":  # one unit less fits exactly
        await reserve(repo, key, amount - 1)


async def test_reserve__revoked_key_or_permission__refused(repo: PrepaidStore) -> None:
    key = await funded(repo, deposit=5_000, allowance=5_000)
    view = await account(repo, key)
    assert view.permission_digest is not None
    await repo.mark_permission_revoked(view.permission_digest)
    with pytest.raises(Refused) as refused:
        await reserve(repo, key, 100)
    assert refused.value.shortfall == "no_permission"
    await repo.revoke_key(key.wallet, key.id)
    with pytest.raises(Refused) as refused:
        await reserve(repo, key, 100)
    assert refused.value.shortfall == "key_revoked"
    assert await repo.key_by_hash(hash_key(key.id)) is None


async def test_sandbox_key__metered_without_account(repo: PrepaidStore) -> None:
    wallet = Account.create().address
    await repo.create_key(
        key_id="key_sbx", secret_hash=hash_key("sbx"), wallet=wallet, name="", mode="sandbox", spend_cap=2_500
    )
    key = await repo.key_by_hash(hash_key("sbx"))
    assert key is not None and not key.live
    one = await reserve(repo, key, 1_000)
    assert await repo.capture(one, 800) == 800
    two = await reserve(repo, key, 1_000)
    with pytest.raises(Refused) as refused:
        await reserve(repo, key, 1_000)
    assert refused.value.shortfall == "key_cap"
    await repo.release(two)
    assert await repo.get_account(wallet) is None  # no account, no ledger: not money
    assert [r.status for r in await repo.usage(wallet, limit=5)] == ["released", "metered"]
    assert await ledger(repo, wallet) == []


async def test_200_concurrent_reservations__never_overspend(repo: PrepaidStore) -> None:
    """200 reservations race for a permission of 37.5 calls (the tightest limit; the key cap and the
    deposit are close behind) while half of the winners capture a little less than they reserved:
    the total never exceeds the permission, on either database, and nothing leaks."""
    key = await funded(repo, deposit=40_000, allowance=37_500, cap=38_000)

    async def attempt(i: int) -> int:
        try:
            reservation = await reserve(repo, key, 1_000)
        except Refused as refused:
            assert refused.shortfall == "permission"
            return 0
        if i % 2:
            return await repo.capture(reservation, 900)
        return 1_000  # still open

    results = await asyncio.gather(*(attempt(i) for i in range(200)))
    used = sum(results)
    assert 37 <= len([r for r in results if r]) < 200
    view = await account(repo, key)
    assert view.reserved + view.unsettled == used <= 37_500
    (state,) = await repo.list_keys(key.wallet)
    assert state.reserved + state.spent == used
    # What is left can still be reserved, down to less than one call.
    while True:
        try:
            await reserve(repo, key, 1_000)
        except Refused:
            break
    view = await account(repo, key)
    assert 36_500 < view.reserved + view.unsettled <= 37_500


async def test_200_concurrent_reservations__key_cap_binds(repo: PrepaidStore) -> None:
    key = await funded(repo, deposit=10**9, allowance=10**9, cap=25_000)
    results = await asyncio.gather(*(reserve(repo, key, 1_000) for _ in range(200)), return_exceptions=True)
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 25
    assert {r.shortfall for r in results if isinstance(r, Refused)} == {"key_cap"}
    (state,) = await repo.list_keys(key.wallet)
    assert (state.reserved, (await account(repo, key)).reserved) == (25_000, 25_000)


async def test_sync_account__compare_and_set(repo: PrepaidStore) -> None:
    key = await funded(repo, deposit=5_000, allowance=5_000)
    seen = await account(repo, key)
    # The settlement worker applies a batch while the chain is being read: its values stand.
    async with repo.sessions.begin() as session:
        await session.execute(
            update(ConsumerAccount)
            .where(ConsumerAccount.wallet == key.wallet)
            .values(
                deposit=ConsumerAccount.deposit - 700, permission_spent=ConsumerAccount.permission_spent + 700
            )
        )
    assert not await repo.sync_account(
        key.wallet, seen=seen, deposit=9_999, pending_withdrawal=0, permission_spent=0
    )
    now = await account(repo, key)
    assert (now.deposit, now.permission_spent) == (4_300, 700)
    assert await repo.sync_account(
        key.wallet, seen=now, deposit=4_300, pending_withdrawal=300, permission_spent=700
    )
    assert (await account(repo, key)).pending_withdrawal == 300


async def test_stale_reservations__listed_for_the_sweeper(repo: PrepaidStore) -> None:
    key = await funded(repo, deposit=5_000, allowance=5_000)
    open_one = await reserve(repo, key, 1_000)
    done = await reserve(repo, key, 1_000)
    await repo.capture(done, 500)
    assert await repo.stale_reservations(utcnow() - timedelta(minutes=5)) == []
    (stale,) = await repo.stale_reservations(utcnow() + timedelta(seconds=1))
    assert stale == open_one
