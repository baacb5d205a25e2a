"""Keyed calls in the call store, and the prepaid store beside it, on SQLite and (through
tools/with-postgres.sh) PostgreSQL: exact account and key counters moved in the same transaction
as the call's row, all-or-nothing reservations naming the limit that refused them, no overspending
under concurrency, the sweeper, and the compare-and-set refresh of the chain mirror."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from eth_account import Account
from quotra.calls.records import CallView, Refused
from quotra.calls.store import CallStore, Hold, Served
from quotra.store.apps_repo import AppsStore, Totals
from quotra.store.db import create_engine, upgrade
from quotra.store.models import ConsumerAccount, utcnow
from quotra.store.prepaid_repo import AccountView, KeyRef, PermissionView, PrepaidStore, Shortfall, hash_key
from quotra.store.repositories import Store
from quotra.store.transactions import Transactions
from sqlalchemy import update

PROVIDER = "0x" + "ab" * 20
LISTING = "lst_1"
NOW = int(time.time())
MARGIN = 600


@dataclass
class Books:
    store: Store
    repo: PrepaidStore
    calls: CallStore


@pytest.fixture
async def books(db_url: str) -> AsyncIterator[Books]:
    engine = create_engine(db_url)
    await upgrade(engine)
    transactions = Transactions(engine)
    store = Store(engine)
    await store.create_listing(
        id=LISTING, owner=PROVIDER, kind="sandbox", base_url=None, models=["m"], api_key_sealed="sealed",
        price_per_call=1_000, price_input_per_mtok=None, price_output_per_mtok=None, max_calls=None,
        calls_used=0, max_input_chars=None, max_input_tokens=None, max_output_tokens=None,
        rate_per_minute=None, expires_at=None, status="active", failure_streak=0, cooldown_until=None,
    )  # fmt: skip
    try:
        yield Books(store, PrepaidStore(store, transactions), CallStore(engine, transactions))
    finally:
        await transactions.close()
        await engine.dispose()


async def funded(
    books: Books,
    *,
    deposit: int,
    allowance: int,
    spent: int = 0,
    pending: int = 0,
    cap: int | None = None,
    mode: str = "live",
    valid_until: int = NOW + 86_400,
) -> KeyRef:
    repo = books.repo
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
        mode=mode,  # type: ignore[arg-type]
        spend_cap=cap,
    )
    ref = await repo.key_by_hash(hash_key(key_id))
    assert ref is not None
    return ref


def hold(key: KeyRef, amount: int, expires_in: float = 900) -> Hold:
    return Hold(key.wallet, LISTING, PROVIDER, amount, utcnow() + timedelta(seconds=expires_in))


async def reserve(books: Books, key: KeyRef, amount: int, now: int = NOW, expires_in: float = 900) -> str:
    call_id, _ = await books.calls.reserve_key(
        hold(key, amount, expires_in), key_id=key.id, live=key.live, now_ts=now, margin=MARGIN
    )
    return call_id


async def refused(books: Books, key: KeyRef, amount: int) -> Shortfall:
    """The limit that refuses reserving `amount`, as the prepaid gate names it."""
    with pytest.raises(Refused) as refusal:
        await reserve(books, key, amount)
    where: Shortfall = "key_cap" if refusal.value.reason == "key_cap" else "deposit"
    return await books.repo.diagnose(key, NOW, MARGIN, where)


def served(model: str = "m", prompt: int = 3, completion: int = 4) -> Served:
    return Served(model, False, prompt, completion, 12)


async def finish(books: Books, call_id: str, amount: int) -> bool:
    return await books.calls.finish(call_id, amount=amount, usage=served())


async def account(books: Books, key: KeyRef) -> AccountView:
    view = await books.repo.get_account(key.wallet)
    assert view is not None
    return view


async def usage(books: Books, wallet: str) -> list[CallView]:
    return await books.calls.of_payer((wallet,), limit=50)


async def calls_used(books: Books) -> int:
    listing = await books.store.get_listing(LISTING)
    assert listing is not None
    return listing.calls_used


async def test_reserve_finish_void__exact_counters_on_the_call_and_its_budgets(books: Books) -> None:
    key = await funded(books, deposit=10_000, allowance=8_000, cap=9_000)
    first = await reserve(books, key, 3_000)
    second = await reserve(books, key, 2_000)
    view = await account(books, key)
    assert (view.reserved, view.unsettled, view.available) == (5_000, 0, 3_000)
    assert await calls_used(books) == 2
    assert await finish(books, first, 1_200)
    assert await books.calls.void(second, outcome="upstream_error", error="UpstreamUnavailable")
    view = await account(books, key)
    assert (view.reserved, view.unsettled, view.available) == (0, 1_200, 6_800)
    (state,) = await books.repo.list_keys(key.wallet)
    assert (state.spent, state.reserved, state.remaining) == (1_200, 0, 7_800)
    assert await calls_used(books) == 1  # the voided call's quota is given back
    calls = {c.id: c for c in await usage(books, key.wallet)}
    one, two = calls[first], calls[second]
    assert (one.gate, one.state, one.reserved, one.amount, one.key_id) == (
        "prepaid",
        "captured",
        3_000,
        1_200,
        key.id,
    )
    assert one.permission_digest == view.permission_digest is not None
    assert (one.model, one.prompt_tokens, one.completion_tokens, one.outcome, one.duration_ms) == (
        "m",
        3,
        4,
        "ok",
        12,
    )
    assert (two.state, two.reserved, two.amount, two.outcome, two.error) == (
        "voided",
        2_000,
        0,
        "upstream_error",
        "UpstreamUnavailable",
    )
    # Ending twice changes nothing.
    assert not await finish(books, first, 1_000)
    assert not await books.calls.void(first, outcome="error")
    assert not await books.calls.void(second, outcome="error")
    assert not await finish(books, second, 500)
    assert (await account(books, key)).unsettled == 1_200
    assert sorted((c.state, c.amount) for c in await usage(books, key.wallet)) == [
        ("captured", 1_200),
        ("voided", 0),
    ]


async def test_a_free_call_settles_at_once(books: Books) -> None:
    """A keyed call that cost nothing owes nothing: settled at once, never batched."""
    key = await funded(books, deposit=10_000, allowance=10_000)
    free = await reserve(books, key, 1_000)
    assert await finish(books, free, 0)
    (call,) = await usage(books, key.wallet)
    assert (call.state, call.amount, call.charged) == ("settled", 0, False)
    view = await account(books, key)
    assert (view.reserved, view.unsettled) == (0, 0)


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
    books: Books, setup: dict[str, int], amount: int, shortfall: str
) -> None:
    key = await funded(books, **setup)  # type: ignore[arg-type]
    assert await refused(books, key, amount) == shortfall
    view = await account(books, key)
    assert (view.reserved, view.unsettled) == (0, 0)
    assert (await books.repo.list_keys(key.wallet))[0].reserved == 0
    assert await usage(books, key.wallet) == [] and await calls_used(books) == 0
    if shortfall != "no_permission":  # one unit less fits exactly
        await reserve(books, key, amount - 1)
        assert (await account(books, key)).reserved == amount - 1


async def test_reserve__revoked_key_or_permission__refused(books: Books) -> None:
    key = await funded(books, deposit=5_000, allowance=5_000)
    view = await account(books, key)
    assert view.permission_digest is not None
    await books.repo.mark_permission_revoked(view.permission_digest)
    assert await refused(books, key, 100) == "no_permission"
    await books.repo.revoke_key(key.wallet, key.id)
    assert await refused(books, key, 100) == "key_revoked"
    assert await books.repo.key_by_hash(hash_key(key.id)) is None
    assert await usage(books, key.wallet) == [] and await calls_used(books) == 0


async def test_reserve__unavailable_listing__refused_before_any_budget(books: Books) -> None:
    key = await funded(books, deposit=5_000, allowance=5_000)
    await books.store.update_listing(LISTING, status="paused")
    with pytest.raises(Refused) as refusal:
        await reserve(books, key, 100)
    assert refusal.value.reason == "listing_unavailable"
    assert (await account(books, key)).reserved == 0
    assert (await books.repo.list_keys(key.wallet))[0].reserved == 0


async def test_sandbox_key__metered_without_account(books: Books) -> None:
    wallet = Account.create().address
    await books.repo.create_key(
        key_id="key_sbx", secret_hash=hash_key("sbx"), wallet=wallet, name="", mode="sandbox", spend_cap=2_500
    )
    key = await books.repo.key_by_hash(hash_key("sbx"))
    assert key is not None and not key.live
    one = await reserve(books, key, 1_000)
    assert await finish(books, one, 800)
    two = await reserve(books, key, 1_000)
    assert await refused(books, key, 1_000) == "key_cap"
    assert await books.calls.void(two, outcome="error")
    assert await books.repo.get_account(wallet) is None  # no account: not money
    calls = {c.id: c for c in await usage(books, wallet)}
    assert (calls[one].gate, calls[one].state, calls[one].amount, calls[one].permission_digest) == (
        "sandbox",
        "settled",  # metered against the key, never settled on-chain
        800,
        None,
    )
    assert (calls[two].state, calls[two].amount) == ("voided", 0)
    (state,) = await books.repo.list_keys(wallet)
    assert (state.spent, state.reserved) == (800, 0)
    assert await books.repo.settled_total(wallet) == 0


async def test_200_concurrent_reservations__never_overspend(books: Books) -> None:
    """200 reservations race for a permission of 37.5 calls (the tightest limit; the key cap and the
    deposit are close behind) while half of the winners finish a little below what they reserved:
    the total never exceeds the permission, on either database, and nothing leaks."""
    key = await funded(books, deposit=40_000, allowance=37_500, cap=38_000)

    async def attempt(i: int) -> int:
        try:
            call_id = await reserve(books, key, 1_000)
        except Refused as refusal:
            assert refusal.reason == "deposit"
            return 0
        if i % 2:
            assert await finish(books, call_id, 900)
            return 900
        return 1_000  # still open

    results = await asyncio.gather(*(attempt(i) for i in range(200)))
    used = sum(results)
    assert 37 <= len([r for r in results if r]) < 200
    view = await account(books, key)
    assert view.reserved + view.unsettled == used <= 37_500
    (state,) = await books.repo.list_keys(key.wallet)
    assert state.reserved + state.spent == used
    calls = await usage(books, key.wallet)
    assert len(calls) == len([r for r in results if r]) == await calls_used(books)
    assert sum(c.amount if c.state == "captured" else c.reserved for c in calls) == used
    assert await books.repo.diagnose(key, NOW, MARGIN, "deposit") == "permission"
    # What is left can still be reserved, down to less than one call.
    while True:
        try:
            await reserve(books, key, 1_000)
        except Refused:
            break
    view = await account(books, key)
    assert 36_500 < view.reserved + view.unsettled <= 37_500


async def test_200_concurrent_reservations__key_cap_binds(books: Books) -> None:
    key = await funded(books, deposit=10**9, allowance=10**9, cap=25_000)
    results = await asyncio.gather(*(reserve(books, key, 1_000) for _ in range(200)), return_exceptions=True)
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 25
    assert {r.reason for r in results if isinstance(r, Refused)} == {"key_cap"}
    assert all(isinstance(r, str | Refused) for r in results)
    (state,) = await books.repo.list_keys(key.wallet)
    assert (state.reserved, (await account(books, key)).reserved) == (25_000, 25_000)
    assert len(await usage(books, key.wallet)) == 25 == await calls_used(books)


async def test_sync_account__compare_and_set(books: Books) -> None:
    repo = books.repo
    key = await funded(books, deposit=5_000, allowance=5_000)
    seen = await account(books, key)
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
    now = await account(books, key)
    assert (now.deposit, now.permission_spent) == (4_300, 700)
    assert await repo.sync_account(
        key.wallet, seen=now, deposit=4_300, pending_withdrawal=300, permission_spent=700
    )
    assert (await account(books, key)).pending_withdrawal == 300


async def test_calls_past_their_deadline__swept__their_budget_given_back(books: Books) -> None:
    key = await funded(books, deposit=5_000, allowance=5_000)
    stuck = await reserve(books, key, 1_000, expires_in=60)
    done = await reserve(books, key, 1_000, expires_in=60)
    later = await reserve(books, key, 1_000, expires_in=3_600)
    assert await finish(books, done, 500)
    assert await books.calls.sweep() == 0  # nothing is past its deadline yet
    assert await books.calls.sweep(utcnow() + timedelta(seconds=61)) == 1
    calls = {c.id: c for c in await usage(books, key.wallet)}
    assert (calls[stuck].state, calls[stuck].outcome) == ("voided", "error")
    assert (calls[done].state, calls[later].state) == ("captured", "reserved")
    view = await account(books, key)
    assert (view.reserved, view.unsettled) == (1_000, 500)
    (state,) = await books.repo.list_keys(key.wallet)
    assert (state.reserved, state.spent) == (1_000, 500)
    assert await calls_used(books) == 2
    assert not await finish(books, stuck, 700)  # finished too late: not charged
    assert (await account(books, key)).unsettled == 500


async def test_one_wallet_connected_to_two_apps__each_permission_its_own_budget(books: Books) -> None:
    """An end user's wallet connected to two apps: each app's calls reserve, capture and give back
    within the permission the wallet signed for that app (and the wallet's one deposit); a revoked
    or disconnected permission refuses, the other goes on."""
    apps = AppsStore(books.store)
    user = Account.create().address
    await books.repo.ensure_account(user)
    seen = await books.repo.get_account(user)
    assert seen is not None
    assert await books.repo.sync_account(
        user, seen=seen, deposit=100_000, pending_withdrawal=0, permission_spent=None
    )
    keys, digests = [], []
    for name, allowance in (("a", 5_000), ("b", 3_000)):
        developer = Account.create().address
        app = await apps.create_app(app_id=f"app_{name * 16}", owner=developer, name=name, markup_bps=2_000)
        digest = "0x" + hash_key(developer + user)
        permission = PermissionView(
            digest,
            user,
            PROVIDER,
            allowance,
            NOW - 60,
            NOW + 86_400,
            "0x" + "00" * 32,
            "0x",
            None,
            developer,
            2_000,
        )
        await apps.connect_wallet(app.id, "u", permission, 0)
        await books.repo.create_key(
            key_id=f"key_{name}", secret_hash=hash_key(name), wallet=developer, name="", mode="live",
            spend_cap=None, app_id=app.id,
        )  # fmt: skip
        key = await books.repo.key_by_hash(hash_key(name))
        assert key is not None
        keys.append(key)
        digests.append(digest)

    async def reserve_for(index: int, amount: int) -> str:
        key = keys[index]
        call_id, _ = await books.calls.reserve_key(
            dataclasses.replace(hold(key, amount), app_id=key.app_id, markup_bps=2_000, end_user="u"),
            key_id=key.id, live=True, now_ts=NOW, margin=MARGIN,
        )  # fmt: skip
        return call_id

    async def budget(index: int) -> tuple[int, int, int]:
        permission = await books.repo.get_permission(digests[index])
        assert permission is not None
        return permission.reserved, permission.unsettled, permission.remaining

    a1, b1 = await reserve_for(0, 3_000), await reserve_for(1, 2_000)
    assert (await budget(0), await budget(1)) == ((3_000, 0, 2_000), (2_000, 0, 1_000))
    with pytest.raises(Refused):
        await reserve_for(0, 2_500)  # beyond a's permission, though the deposit could pay it
    b2 = await reserve_for(1, 1_000)
    assert await finish(books, a1, 1_200)
    assert await books.calls.void(b1, outcome="error")
    assert await finish(books, b2, 900)
    assert (await budget(0), await budget(1)) == ((0, 1_200, 3_800), (0, 900, 2_100))
    view = await books.repo.get_account(user)
    assert view is not None and (view.reserved, view.unsettled, view.permission_digest) == (0, 2_100, None)
    calls = {c.id: c for c in await usage(books, user)}
    assert (calls[a1].permission_digest, calls[b2].permission_digest) == (digests[0], digests[1])
    # Each app's analytics count its own calls (one query that groups by end user on both databases).
    hour = timedelta(hours=1)
    _, per_user = await apps.analytics(keys[0].app_id or "", utcnow() - hour, utcnow() + hour, sandbox=False)
    assert per_user == {"u": Totals(1, 3, 4, 1_200, 0, 0)}

    await books.repo.mark_permission_revoked(digests[0])  # revoked on-chain
    with pytest.raises(Refused):
        await reserve_for(0, 100)
    assert await apps.disconnect(keys[1].app_id or "", wallet=user) == ["u"]
    with pytest.raises(Refused):  # hosted again: its developer, who has no permission, pays
        await reserve_for(1, 100)
    assert (await apps.user(keys[1].app_id or "", "u")).wallet is None
    assert await books.repo.connected_permissions(user) == []
    assert len(await usage(books, user)) == 3
