"""A hypothesis state machine over the call store alone: reserve, finish, void, settle, fail,
sweep and crash, in random order, from two "replicas" (two engines and two transaction runners on
one database, each running bursts of concurrent work), on SQLite and on PostgreSQL when provided.

After every step the budgets the store keeps are checked against the calls themselves: a listing's
quota, its free calls today (shared by four consumers) and each consumer's playground counter, the
prepaid account and key, and the x402 payer's pending money never drift from the calls that hold
them, never exceed what they may, and a sweep after every deadline leaves no reservation behind.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from quotra.calls.outbox import Outbox
from quotra.calls.records import OPEN, Refused, X402Hold
from quotra.calls.store import CallStore, Hold, Served
from quotra.store.db import create_engine, upgrade
from quotra.store.models import (
    ApiKeyRecord,
    Call,
    ConsumerAccount,
    Listing,
    PlaygroundUsage,
    SpendPermissionRecord,
    X402Authorization,
    X402Payer,
    utc_day,
    utcnow,
)
from quotra.store.repositories import Store
from quotra.store.transactions import Transactions
from sqlalchemy import func, select

EXAMPLES = int(os.environ.get("CALLS_FUZZ_EXAMPLES", "25"))
PG_URL = os.environ.get("QUOTRA_TEST_POSTGRES_URL")
PROVIDER = "0x" + "ab" * 20
MARGIN = 600
FREE_CALLS = 3  # per consumer and listing
DAILY_DEFAULT = 4  # free calls a day of a listing that sets none
CONSUMERS = 4  # the playground's callers


@dataclass
class World:
    """One database, two replicas of the store."""

    loop: asyncio.AbstractEventLoop
    store: Store
    replicas: list[tuple[CallStore, Outbox]]
    closers: list[Any] = field(default_factory=list)

    def run(self, work: Any) -> Any:
        return self.loop.run_until_complete(work)


def _database(backend: str, tmp_path: Any, loop: asyncio.AbstractEventLoop) -> tuple[str, Any]:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}", None
    from relay_helpers import create_pg_database

    assert PG_URL is not None
    url, drop = loop.run_until_complete(create_pg_database(PG_URL))
    return url, drop


@pytest.fixture(params=["sqlite", "postgresql"] if PG_URL else ["sqlite"])
def world(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[World]:
    loop = asyncio.new_event_loop()
    url, drop = _database(request.param, tmp_path, loop)
    engines = [create_engine(url), create_engine(url)]
    loop.run_until_complete(upgrade(engines[0]))
    runners = [Transactions(e) for e in engines]
    world = World(
        loop,
        Store(engines[0]),
        [(CallStore(e, t), Outbox(e, t)) for e, t in zip(engines, runners, strict=True)],
    )
    try:
        yield world
    finally:
        for runner in runners:
            loop.run_until_complete(runner.close())
        for engine in engines:
            loop.run_until_complete(engine.dispose())
        if drop is not None:
            loop.run_until_complete(drop())
        loop.close()


@dataclass
class Open:
    """A call the machine's "client" still holds (reserved, not yet finished or voided)."""

    call_id: str
    gate: str
    reserved: int


class CallStoreMachine(RuleBasedStateMachine):
    world: World

    def __init__(self) -> None:
        super().__init__()
        self.tag = secrets.token_hex(4)
        self.counter = itertools.count()
        self.open: list[Open] = []
        self.block = 100

    # ---- setup ---------------------------------------------------------------------------------

    @initialize(
        max_calls=st.integers(1, 12),
        daily=st.integers(0, 6),
        deposit=st.integers(0, 5_000),
        allowance=st.integers(0, 5_000),
        cap=st.one_of(st.none(), st.integers(0, 3_000)),
        balance=st.integers(0, 5_000),
    )
    def setup(
        self, max_calls: int, daily: int, deposit: int, allowance: int, cap: int | None, balance: int
    ) -> None:
        w = self.world
        self.listings = [f"lst_{self.tag}_a", f"lst_{self.tag}_b"]
        self.wallet = "0x" + secrets.token_hex(20)
        self.payer = "0x" + secrets.token_hex(20)
        self.keys = {f"key_{self.tag}_live": True, f"key_{self.tag}_test": False}
        self.balance = balance

        async def seed() -> None:
            # Listing a: its own quota and daily free calls; b: neither (the relay's default).
            for listing_id, limit, free in zip(self.listings, (max_calls, None), (daily, None), strict=True):
                await w.store.create_listing(
                    id=listing_id,
                    owner=PROVIDER,
                    kind="sandbox",
                    base_url=None,
                    models=["m"],
                    api_key_sealed="-",
                    price_per_call=1,
                    max_calls=limit,
                    free_calls_per_day=free,
                )
            async with w.store.sessions.begin() as session:
                digest = "0x" + secrets.token_hex(32)
                session.add(
                    SpendPermissionRecord(
                        digest=digest, consumer=self.wallet, spender=PROVIDER, allowance=allowance,
                        valid_after=0, valid_until=2**40, salt="0x01", signature="0x",
                    )
                )  # fmt: skip
                session.add(
                    ConsumerAccount(
                        wallet=self.wallet, deposit=deposit, pending_withdrawal=0, permission_digest=digest,
                        permission_allowance=allowance, permission_spent=0, reserved=0, unsettled=0,
                    )
                )  # fmt: skip
                for key_id, live in self.keys.items():
                    session.add(
                        ApiKeyRecord(
                            id=key_id, key_hash=secrets.token_hex(32), wallet=self.wallet, name="",
                            mode="live" if live else "sandbox", spend_cap=cap, spent=0, reserved=0,
                        )
                    )  # fmt: skip

        w.run(seed())
        note(f"listing a: max_calls={max_calls}, free calls a day={daily}")
        note(f"deposit={deposit}, allowance={allowance}, cap={cap}")

    # ---- helpers ---------------------------------------------------------------------------------

    def replica(self, index: int) -> tuple[CallStore, Outbox]:
        return self.world.replicas[index % len(self.world.replicas)]

    def hold(self, listing: int, payer: str, amount: int) -> Hold:
        return Hold(payer, self.listings[listing], PROVIDER, amount, utcnow() + timedelta(minutes=15))

    async def _reserve(self, replica: int, kind: str, listing: int, amount: int) -> Open | None:
        calls, _ = self.replica(replica)
        try:
            if kind == "playground":  # `amount` picks the consumer
                call_id = await calls.reserve_playground(
                    self.hold(listing, f"ip:{self.tag}:{amount % CONSUMERS}", 0),
                    free_calls=FREE_CALLS,
                    daily_default=DAILY_DEFAULT,
                )
                return Open(call_id, "playground", 0)
            if kind in ("prepaid", "sandbox"):
                key_id, live = list(self.keys.items())[0 if kind == "prepaid" else 1]
                call_id = await calls.reserve_key(
                    self.hold(listing, self.wallet, amount),
                    key_id=key_id,
                    live=live,
                    now_ts=10**9,
                    margin=MARGIN,
                )
                return Open(call_id, kind, amount)
            nonce = "0x" + secrets.token_hex(32)
            auth = X402Hold(
                payer=self.payer, nonce=nonce, value=amount, valid_after=0, valid_before=2**40,
                signature="0x" + "00" * 65, request_hash="0" * 64, balance=self.balance, block=self.block,
            )  # fmt: skip
            call_id = await calls.reserve_x402(self.hold(listing, self.payer, amount), auth)
            return Open(call_id, "x402", amount)
        except Refused as refused:
            note(f"{kind} refused: {refused.reason}")
            return None

    # ---- rules -----------------------------------------------------------------------------------

    @rule(
        burst=st.lists(
            st.tuples(
                st.integers(0, 1),
                st.sampled_from(("playground", "prepaid", "sandbox", "x402", "x402")),
                st.integers(0, 1),
                st.integers(1, 900),
            ),
            min_size=1,
            max_size=8,
        )
    )
    def reserve_concurrently(self, burst: list[tuple[int, str, int, int]]) -> None:
        """Concurrent reservations from both replicas at once."""

        async def together() -> list[Open | None]:
            return list(await asyncio.gather(*(self._reserve(*args) for args in burst)))

        done = self.world.run(together())
        self.open.extend(o for o in done if o is not None)
        note(f"reserved {sum(o is not None for o in done)} of {len(burst)}")

    # Which reservations of a concurrent burst succeed depends on how the replicas' transactions
    # interleave, so nothing drawn may depend on them (hypothesis requires the same draws when it
    # replays an example): rules pick an open call by an index drawn up front, and do nothing when
    # none is open, instead of preconditions and draws sized by `self.open`.

    def _take(self, pick: int) -> Open | None:
        return self.open.pop(pick % len(self.open)) if self.open else None

    @rule(pick=st.integers(0, 63), replica=st.integers(0, 1), used=st.floats(0, 1.5))
    def finish(self, pick: int, replica: int, used: float) -> None:
        held = self._take(pick)
        if held is None:
            return
        amount = held.reserved if held.gate == "x402" else int(held.reserved * used)
        amount = min(amount, held.reserved)
        calls, _ = self.replica(replica)
        finished = self.world.run(
            calls.finish(held.call_id, amount=amount, usage=Served("m", False, 1, 1, 5))
        )
        assert finished, f"{held} could not finish"

    @rule(pick=st.integers(0, 63), replica=st.integers(0, 1))
    def void(self, pick: int, replica: int) -> None:
        held = self._take(pick)
        if held is None:
            return
        calls, _ = self.replica(replica)
        assert self.world.run(calls.void(held.call_id, outcome="upstream_error"))
        # Ending a call twice, whoever tries, changes nothing.
        assert not self.world.run(calls.void(held.call_id, outcome="error"))
        assert not self.world.run(calls.finish(held.call_id, amount=1, usage=Served("m", False, 0, 0, 0)))

    @rule()
    def crash(self) -> None:
        """The relay holding the open calls dies: nobody will finish them; only the sweeper ends them."""
        note(f"crash with {len(self.open)} calls open")
        self.open.clear()

    @rule(sweep_late=st.booleans(), replica=st.integers(0, 1))
    def sweep(self, sweep_late: bool, replica: int) -> None:
        calls, _ = self.replica(replica)
        now = utcnow() + timedelta(hours=1) if sweep_late else utcnow()
        self.world.run(calls.sweep(now))
        if sweep_late:  # every deadline has passed: nothing may stay reserved
            self.open.clear()
            assert self._count(Call.state == "reserved") == 0

    @rule(replica=st.integers(0, 1), outcome=st.sampled_from(("settle", "settle", "fail", "release")))
    def settle_x402(self, replica: int, outcome: str) -> None:
        """The settlement worker takes a batch; the chain settles it (at a new block), refuses it,
        or it must be sent again."""
        _, outbox = self.replica(replica)
        batch = self.world.run(outbox.claim_x402_batch(16, 0, 0))
        if batch is None:
            return
        self.block += 1
        for row in self.world.run(outbox.batch_x402(batch.id)):
            if outcome == "settle":
                assert self.world.run(
                    outbox.settle_x402(row.call_id, tx_hash="0x01", fee=0, block=self.block)
                )
                if row.payer == self.payer:
                    self.balance -= row.amount  # the chain moved it at self.block
            elif outcome == "fail":
                assert self.world.run(outbox.fail_x402(row.call_id, "refused", payer_fault=False))
            else:
                assert self.world.run(outbox.release_x402(row.call_id, "lost"))
        self.world.run(outbox.close_batch(batch.id, "confirmed"))

    @rule(replica=st.integers(0, 1))
    def settle_charges(self, replica: int) -> None:
        _, outbox = self.replica(replica)
        for digest, _oldest in self.world.run(outbox.charge_backlog()):
            batch = self.world.run(outbox.claim_charge_batch(digest, 256))
            if batch is not None:
                self.world.run(
                    outbox.settle_charges(batch, tx_hash="0x02", gas_used=None, fee_bps=1_000, total_fee=0)
                )

    @rule(top_up=st.integers(0, 2_000))
    def payer_balance_changes(self, top_up: int) -> None:
        """A new block: the payer received USDC (the next reservation sees it with its block)."""
        self.block += 1
        self.balance += top_up

    # ---- invariants ------------------------------------------------------------------------------

    def _count(self, *where: Any) -> int:
        async def read() -> int:
            async with self.world.store.sessions() as session:
                query = (
                    select(func.count()).select_from(Call).where(Call.listing_id.in_(self.listings), *where)
                )
                return int((await session.execute(query)).scalar_one())

        return self.world.run(read())

    def _rows(self) -> tuple[list[Call], dict[str, Any], Any, dict[str, ApiKeyRecord], list[Any], Any]:
        async def read() -> Any:
            async with self.world.store.sessions() as session:
                calls = list(
                    (await session.scalars(select(Call).where(Call.listing_id.in_(self.listings)))).all()
                )
                listings = {
                    r.id: r
                    for r in (
                        await session.scalars(select(Listing).where(Listing.id.in_(self.listings)))
                    ).all()
                }
                account = await session.get(ConsumerAccount, self.wallet)
                keys = {k: await session.get(ApiKeyRecord, k) for k in self.keys}
                usage = list(
                    (
                        await session.scalars(
                            select(PlaygroundUsage).where(PlaygroundUsage.listing_id.in_(self.listings))
                        )
                    ).all()
                )
                auths = list(
                    (
                        await session.scalars(
                            select(X402Authorization).where(X402Authorization.payer == self.payer)
                        )
                    ).all()
                )
                payer = await session.get(X402Payer, self.payer)
                return calls, listings, account, keys, usage, (auths, payer)

        return self.world.run(read())

    @invariant()
    def budgets_match_the_calls(self) -> None:
        if not hasattr(self, "wallet"):
            return
        calls, listings, account, keys, usage, (auths, payer) = self._rows()
        live = [c for c in calls if c.state != "voided"]
        # Each listing's quota holds exactly its calls that were not voided, never above its cap.
        for listing_id, listing in listings.items():
            held = sum(1 for c in live if c.listing_id == listing_id)
            assert listing.calls_used == held, (listing_id, listing.calls_used, held)
            assert listing.max_calls is None or listing.calls_used <= listing.max_calls
        # Playground: each consumer's counter is its free calls not voided, at most 3 a listing;
        # a listing's free calls today are those taken today, by anyone, within its daily budget.
        free = [c for c in live if c.gate == "playground"]
        for row in usage:
            held = sum(1 for c in free if c.listing_id == row.listing_id and c.payer == row.consumer)
            assert row.calls == held <= FREE_CALLS, (row.listing_id, row.consumer, row.calls, held)
        for listing_id, listing in listings.items():
            day = listing.free_calls_day
            today = [c for c in free if c.listing_id == listing_id and utc_day(c.created_at) == day]
            budget = DAILY_DEFAULT if listing.free_calls_per_day is None else listing.free_calls_per_day
            assert listing.free_calls_today == len(today) <= budget, (listing_id, listing.free_calls_today)
        # Prepaid: the account's reserved and unsettled are its calls', within its limits.
        prepaid = [c for c in calls if c.gate == "prepaid"]
        reserved = sum(c.reserved for c in prepaid if c.state == "reserved")
        unsettled = sum(c.amount for c in prepaid if c.state in ("captured", "settling"))
        settled = sum(c.amount for c in prepaid if c.state == "settled")
        assert account.reserved == reserved and account.unsettled == unsettled
        assert account.permission_spent == settled
        assert reserved + unsettled <= account.deposit
        assert reserved + unsettled + account.permission_spent <= account.permission_allowance
        # Keys: reserved and spent are their calls', never above the cap.
        for key_id, key in keys.items():
            mine = [c for c in calls if c.key_id == key_id]
            assert key.reserved == sum(c.reserved for c in mine if c.state == "reserved")
            assert key.spent == sum(c.amount for c in mine if c.state not in ("reserved", "voided"))
            assert key.spend_cap is None or key.spent + key.reserved <= key.spend_cap
        # x402: what the payer owes beyond its snapshot never exceeds the snapshot's balance, and
        # an authorization is pending exactly while its money may still leave the payer.
        by_call = {c.id: c for c in calls}
        for auth in auths:
            state = by_call[auth.call_id].state
            if state in ("voided", "failed"):
                assert not auth.pending
            elif state in OPEN:
                assert auth.pending
        if payer is not None:
            owed = sum(
                a.value
                for a in auths
                if a.pending and (a.settled_block is None or a.settled_block > payer.block)
            )
            assert owed <= payer.balance, (owed, payer.balance, payer.block)


def test_call_store_state_machine(world: World) -> None:
    CallStoreMachine.world = world
    machine = CallStoreMachine.TestCase
    machine.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    machine().runTest()
