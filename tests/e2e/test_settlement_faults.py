"""The settlement worker against the twin when things go wrong: the RPC goes away, the process dies
after sending, an authorization is front-run, a payment is refunded; and prepaid charges."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from e2e_helpers import FEE_BPS, MAX_BPS, ChainProxy, Kit, OnChain, provider_share
from eth_account import Account
from prometheus_client import generate_latest
from quotra.calls.outbox import Outbox
from quotra.calls.store import Hold, Served
from quotra.chain import eip712
from quotra.chain.client import EscrowClient
from quotra.chain.relayer import ChainCall, DirectRelayer, RelayerError, Submission
from quotra.metrics import Metrics
from quotra.payments.indexer import EscrowEvents, Indexer
from quotra.payments.settlement import LeaderLock, SettlementConfig, SettlementWorker, payment_args
from quotra.store.models import ApiKeyRecord, ConsumerAccount, SpendPermissionRecord, utcnow
from quotra_dev.chain import sign_authorization

USDC = 10**6
FAST = SettlementConfig(batch_size=16, max_age=0.0, poll=0.05, retry_base=0.05, retry_max=0.2)


async def tick_until(worker: SettlementWorker, done: Any, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        await worker.tick()
        if await done():
            return
        assert time.monotonic() < deadline, "the worker did not get there in time"
        await asyncio.sleep(0.05)


def worker(kit: Kit, client: EscrowClient | None = None, relayer: Any = None) -> SettlementWorker:
    return SettlementWorker(
        kit.outbox, client or kit.client, relayer or kit.relayer, FAST, start_block=kit.onchain.start_block
    )


def fee(amount: int) -> int:
    return amount * FEE_BPS // MAX_BPS


async def states(outbox: Outbox, *call_ids: str) -> list[str]:
    return [(await outbox.get_x402(i)).state for i in call_ids]  # type: ignore[union-attr]


async def books_match_the_escrow(kit: Kit, *expected: tuple[str, int, int]) -> None:
    """Each provider's settled calls add up to (amount, fee), exactly what the escrow's `Credited`
    events credited it: every payment credited once, and recorded once."""
    books = await kit.outbox.credited_by_provider()
    for provider, amount, fees in expected:
        assert books[provider] == (amount, fees) == kit.onchain.credited(provider), (provider, books)


async def test_rpc_down_during_settlement_is_retried_and_settles_once_back(kit: Kit) -> None:
    earner = Account.create().address
    payer = kit.onchain.funded_payer(USDC)
    rows = [await kit.captured(payer, earner, 2_500) for _ in range(3)]
    proxy = ChainProxy(kit.onchain.twin.port)
    dead = EscrowClient.connect(
        proxy.url, escrow=kit.client.escrow_address, usdc=kit.client.usdc_address, chain_id=84532, timeout=2
    )
    w = worker(kit, dead, DirectRelayer(dead.w3, kit.onchain.operator, chain_id=84532))
    for _ in range(3):
        await w.tick()
        await asyncio.sleep(0.06)
    (batch,) = await kit.outbox.batches(["pending"])
    assert batch.attempts >= 1 and batch.error and batch.tx_hash is None
    assert await states(kit.outbox, *(r.call_id for r in rows)) == ["settling"] * 3
    assert kit.onchain.earnings(earner) == 0

    await proxy.set("forward")
    try:

        async def all_settled() -> bool:
            return await states(kit.outbox, *(r.call_id for r in rows)) == ["settled"] * 3

        await tick_until(w, all_settled)
    finally:
        await proxy.close()
        await dead.close()
    assert kit.onchain.earnings(earner) == 3 * provider_share(2_500)
    (confirmed,) = await kit.outbox.batches(["confirmed"])
    assert confirmed.items == 3 and confirmed.gas_used and confirmed.amount == 3 * 2_500
    for row in rows:
        call = await kit.calls.get(row.call_id)
        assert call is not None and (call.tx_hash, call.fee) == (confirmed.tx_hash, fee(2_500))
    await books_match_the_escrow(kit, (earner, 3 * 2_500, 3 * fee(2_500)))


class LostAfterSend:
    """Sends, then fails as if the process died before writing down what it sent."""

    name = "direct"

    def __init__(self, inner: DirectRelayer) -> None:
        self.inner = inner
        self.sent: list[Submission] = []

    async def send(self, call: ChainCall, *, memo: str | None = None) -> Submission:
        self.sent.append(await self.inner.send(call, memo=memo))
        raise RelayerError("connection reset after sending")

    async def status(self, submission_id: str) -> Submission:
        return await self.inner.status(submission_id)


async def test_batch_sent_before_a_crash_is_recognised_and_not_paid_twice(kit: Kit) -> None:
    provider = Account.create().address
    payer = kit.onchain.funded_payer(USDC)
    row = await kit.captured(payer, provider, 4_000)
    lost = LostAfterSend(kit.relayer)
    await worker(kit, relayer=lost).tick()
    assert len(lost.sent) == 1
    (batch,) = await kit.outbox.batches(["pending"])
    assert batch.attempts == 1 and batch.tx_hash is None  # the database never learnt the hash
    assert kit.onchain.earnings(provider) == provider_share(4_000)  # but it is on-chain
    assert await states(kit.outbox, row.call_id) == ["settling"]

    restarted = worker(kit)  # a new process: checks the chain before sending again

    async def done() -> bool:
        return await states(kit.outbox, row.call_id) == ["settled"]

    await tick_until(restarted, done)
    assert (await kit.outbox.get_x402(row.call_id)).tx_hash == lost.sent[0].tx_hash  # type: ignore[union-attr]
    for _ in range(3):  # nothing is sent again
        await restarted.tick()
    assert len(lost.sent) == 1
    assert kit.onchain.earnings(provider) == provider_share(4_000)
    await books_match_the_escrow(kit, (provider, 4_000, fee(4_000)))
    assert await kit.outbox.batches(["pending", "submitted"]) == []


class FailsFirstSend:
    """The operator's relayer, but the first transaction sent with `memo` fails before sending."""

    name = "direct"

    def __init__(self, inner: DirectRelayer, *, memo: str) -> None:
        self.inner = inner
        self.memo = memo
        self.failed = False

    @property
    def address(self) -> str:
        return self.inner.address

    async def send(self, call: ChainCall, *, memo: str | None = None) -> Submission:
        if memo == self.memo and not self.failed:
            self.failed = True
            raise RelayerError("the node went away")
        return await self.inner.send(call, memo=memo)

    async def status(self, submission_id: str) -> Submission:
        return await self.inner.status(submission_id)


async def test_front_run_authorization_is_reconciled_once(kit: Kit) -> None:
    onchain = kit.onchain
    first_block = int(onchain.chain.w3.eth.block_number) + 1  # the twin is shared: index this test only
    provider = Account.create().address
    payer = onchain.funded_payer(USDC)
    front_run = await kit.captured(payer, provider, 5_000)
    normal = await kit.captured(payer, provider, 1_000)
    # A third party who saw the signature submits it to USDC first: the escrow gets the USDC uncredited.
    args = payment_args(front_run)
    sig = args.signature
    onchain.chain.transact(
        onchain.usdc.functions.transferWithAuthorization(
            args.payer, onchain.escrow.address, args.amount, args.valid_after, args.valid_before, args.nonce,
            sig.v, sig.r, sig.s,
        ),
        onchain.outsider,
    )  # fmt: skip
    excess = onchain.excess()
    operator_usdc = onchain.balance(onchain.operator.address)
    flaky = FailsFirstSend(kit.relayer, memo=front_run.call_id)
    w = worker(kit, relayer=flaky)

    async def reconciling() -> bool:
        return await states(kit.outbox, front_run.call_id, normal.call_id) == ["reconciling", "settled"]

    # The batch lands without it (USDC refuses the used authorization); its reconcile fails once.
    await tick_until(w, reconciling)
    assert flaky.failed and onchain.balance(onchain.operator.address) == operator_usdc
    assert onchain.earnings(provider) == provider_share(1_000)

    async def done() -> bool:
        return await states(kit.outbox, front_run.call_id, normal.call_id) == ["settled", "settled"]

    await tick_until(w, done)  # retried
    assert onchain.earnings(provider) == provider_share(5_000) + provider_share(1_000)
    # The front-run call was credited by its reconcile, the other by the batch USDC refused the
    # front-run one in.
    events = EscrowEvents(kit.client, first_block)
    reconciled = await events.credit_of(payer.address, front_run.nonce)
    batched = await events.credit_of(payer.address, normal.nonce)
    assert reconciled is not None and batched is not None
    assert (reconciled.kind, reconciled.amount, reconciled.fee) == ("reconciled", 5_000, fee(5_000))
    assert batched.kind == "settled" and batched.tx_hash != reconciled.tx_hash
    recorded = await kit.outbox.get_x402(front_run.call_id)
    assert recorded is not None and recorded.tx_hash == reconciled.tx_hash
    assert (await kit.outbox.get_x402(normal.call_id)).tx_hash == batched.tx_hash  # type: ignore[union-attr]
    # The operator paid the provider's credit; the front-run funds wait for the owner's sweep.
    assert onchain.balance(onchain.operator.address) == operator_usdc - 5_000
    assert onchain.excess() == excess
    assert onchain.solvent()
    for _ in range(3):  # nothing more happens
        await w.tick()
    assert onchain.earnings(provider) == provider_share(5_000) + provider_share(1_000)
    assert onchain.balance(onchain.operator.address) == operator_usdc - 5_000
    await books_match_the_escrow(kit, (provider, 6_000, fee(5_000) + fee(1_000)))
    indexer = Indexer(kit.outbox, kit.client, start_block=first_block)
    await indexer.step()
    assert indexer.found == []
    assert await indexer.full_check() == []


async def test_settled_payment_is_refunded_through_the_escrow(kit: Kit) -> None:
    first_block = int(kit.onchain.chain.w3.eth.block_number) + 1
    provider = Account.create().address
    payer = kit.onchain.funded_payer(USDC)
    row = await kit.captured(payer, provider, 7_000)
    w = worker(kit)

    async def done() -> bool:
        return await states(kit.outbox, row.call_id) == ["settled"]

    await tick_until(w, done)
    await books_match_the_escrow(kit, (provider, 7_000, fee(7_000)))
    paid = kit.onchain.balance(payer.address)
    settled = await kit.calls.get(row.call_id)
    assert settled is not None and settled.tx_hash is not None
    tx_hash = await w.refund(row.call_id)
    assert tx_hash.startswith("0x") and tx_hash != settled.tx_hash
    assert kit.onchain.balance(payer.address) == paid + 7_000
    assert kit.onchain.earnings(provider) == 0
    assert await states(kit.outbox, row.call_id) == ["refunded"]
    call = await kit.calls.get(row.call_id)
    # The call keeps the transaction that credited it; the refund's is the escrow's event.
    assert call is not None and call.tx_hash == settled.tx_hash and not call.charged
    assert (await kit.outbox.credited_by_provider())[provider] == (0, 0)  # refunded: owed nothing
    with pytest.raises(RelayerError):
        await w.refund(row.call_id)  # once only
    assert kit.onchain.balance(payer.address) == paid + 7_000
    indexer = Indexer(kit.outbox, kit.client, start_block=first_block)
    assert await indexer.full_check() == []  # the escrow's credits less its refunds == the calls


async def test_expired_authorization_fails_and_is_reported(kit: Kit) -> None:
    payer = kit.onchain.funded_payer(USDC)
    row = await kit.captured(payer, Account.create().address, 1_000, valid_for=5)
    await worker(kit).tick()  # expires within min_validity: never sent
    assert await states(kit.outbox, row.call_id) == ["failed"]
    assert await kit.outbox.batches(["pending", "submitted", "confirmed"]) == []
    metrics = Metrics()
    indexer = Indexer(kit.outbox, kit.client, metrics, start_block=kit.onchain.start_block)
    found = await indexer.audit()
    assert [d.kind for d in found] == ["unpaid_call"] and found[0].reference == row.call_id
    indexer._publish(found)  # what the app's indexer does after each audit: /metrics shows it
    text = generate_latest(metrics.registry).decode()
    assert 'quotra_reconcile_open_discrepancies{kind="unpaid_call"} 1.0' in text


async def prepaid_call(kit: Kit, consumer: str, key_id: str, provider: str, amount: int) -> str:
    """A prepaid call reserved against the account and key, then served and captured for
    `amount`, as the paid-call path leaves it."""
    listing = await kit.store.create_listing(
        id="lst_" + secrets.token_hex(6),
        owner=provider,
        kind="sandbox",
        base_url=None,
        models=["sandbox-model"],
        api_key_sealed="-",
        price_per_call=amount,
    )
    hold = Hold(consumer, listing.id, provider, amount, utcnow() + timedelta(minutes=15))
    call_id, _ = await kit.calls.reserve_key(
        hold, key_id=key_id, live=True, now_ts=int(time.time()), margin=60
    )
    assert await kit.calls.finish(call_id, amount=amount, usage=Served("sandbox-model", False, 3, 5, 10))
    return call_id


async def test_prepaid_charges_settle_per_permission_in_order(kit: Kit, monkeypatch: Any) -> None:
    onchain = kit.onchain
    first_block = int(onchain.chain.w3.eth.block_number) + 1  # the twin is shared: index this test only
    consumer = onchain.funded_payer(10 * USDC)
    deposit = sign_authorization(
        consumer, onchain.domain, onchain.escrow.address, 5 * USDC, primary="ReceiveWithAuthorization"
    )
    onchain.chain.transact(
        onchain.escrow.functions.deposit_with_authorization(*deposit.deposit_args()), onchain.outsider
    )
    now = int(onchain.chain.w3.eth.get_block("latest")["timestamp"])
    permission = {
        "consumer": consumer.address,
        "spender": onchain.operator.address,
        "allowance": 3 * USDC,
        "valid_after": now - 10,
        "valid_until": now + 86_400,
        "salt": secrets.randbits(64),
        "developer": "0x" + "00" * 20,
        "max_markup_bps": 0,
    }
    domain = eip712.escrow_domain(84532, onchain.escrow.address)
    digest = "0x" + eip712.digest(domain, "SpendPermission", permission).hex()
    signature = eip712.sign(consumer.key, domain, "SpendPermission", permission)
    p1, p2 = Account.create().address, Account.create().address
    first = [(p1, 1_234)] * 3 + [(p2, 777)] * 2
    key_id = "key_" + secrets.token_hex(8)
    async with kit.store.sessions.begin() as session:
        session.add(
            SpendPermissionRecord(
                digest=digest, consumer=consumer.address, spender=onchain.operator.address,
                allowance=permission["allowance"], valid_after=permission["valid_after"],
                valid_until=permission["valid_until"], salt=hex(permission["salt"]), signature=signature.hex,
            )
        )  # fmt: skip
        session.add(
            ConsumerAccount(
                wallet=consumer.address, deposit=5 * USDC, pending_withdrawal=0, permission_digest=digest,
                permission_allowance=3 * USDC, permission_spent=0, reserved=0, unsettled=0,
            )
        )  # fmt: skip
        session.add(
            ApiKeyRecord(id=key_id, key_hash=secrets.token_hex(32), wallet=consumer.address, mode="live")
        )
    calls = [
        await prepaid_call(kit, consumer.address, key_id, provider, amount) for provider, amount in first
    ]
    total = 3 * 1_234 + 2 * 777
    async with kit.store.sessions() as session:
        account = await session.get(ConsumerAccount, consumer.address)
        assert account is not None and (account.reserved, account.unsettled) == (0, total)
    w = worker(kit)

    async def batch_confirmed() -> bool:
        return len(await kit.outbox.batches(["confirmed"])) == 1

    await tick_until(w, batch_confirmed)
    (batch,) = await kit.outbox.batches(["confirmed"])
    assert batch.kind == "charges" and batch.items == 5 and batch.amount == total
    assert batch.permission_digest == digest
    assert await kit.client.reference_settled(bytes.fromhex(batch.reference[2:]))
    share1, share2 = provider_share(3 * 1_234), provider_share(2 * 777)
    assert (onchain.earnings(p1), onchain.earnings(p2)) == (share1, share2)
    assert onchain.escrow.functions.permission_spent(bytes.fromhex(digest[2:])).call() == total
    # Every call settled in that transaction; each provider's calls carry its fee to the unit.
    for call_id in calls:
        call = await kit.calls.get(call_id)
        assert call is not None and (call.gate, call.state, call.tx_hash) == (
            "prepaid",
            "settled",
            batch.tx_hash,
        )
    await books_match_the_escrow(kit, (p1, 3 * 1_234, 3 * 1_234 - share1), (p2, 2 * 777, 2 * 777 - share2))
    async with kit.store.sessions() as session:
        account = await session.get(ConsumerAccount, consumer.address)
        assert account is not None
        assert (account.reserved, account.unsettled, account.permission_spent, account.deposit) == (
            0,
            0,
            total,
            5 * USDC - total,
        )
        key = await session.get(ApiKeyRecord, key_id)
        assert key is not None and (key.reserved, key.spent) == (0, total)

    # A second batch under the same permission, under its own reference (each settles once).
    later = await prepaid_call(kit, consumer.address, key_id, p2, 500)

    async def two_confirmed() -> bool:
        return len(await kit.outbox.batches(["confirmed"])) == 2

    await tick_until(w, two_confirmed)
    second = (await kit.outbox.batches(["confirmed"]))[-1]
    assert second.reference != batch.reference and (second.items, second.amount) == (1, 500)
    assert (await kit.calls.get(later)).tx_hash == second.tx_hash  # type: ignore[union-attr]
    assert onchain.earnings(p2) == share2 + provider_share(500)
    assert onchain.escrow.functions.permission_spent(bytes.fromhex(digest[2:])).call() == total + 500
    await books_match_the_escrow(
        kit, (p1, 3 * 1_234, 3 * 1_234 - share1), (p2, 2 * 777 + 500, 2 * 777 - share2 + fee(500))
    )
    assert onchain.solvent()
    # The indexer finds both ChargesSettled events and accounts for them.
    indexer = Indexer(kit.outbox, kit.client, start_block=first_block)
    assert await indexer.step() >= 2
    assert indexer.found == []
    # While the chain has no newer block a poll reads nothing, not even the cursor (an idle
    # relay's indexer costs one eth_blockNumber); the next block's events are read as before.
    with monkeypatch.context() as patch:

        async def no_cursor(contract: str) -> int:
            raise AssertionError("the cursor was read with no new block")

        patch.setattr(kit.outbox, "cursor", no_cursor)
        assert await indexer.step() == 0
    third = await prepaid_call(kit, consumer.address, key_id, p2, 300)

    async def three_confirmed() -> bool:
        return len(await kit.outbox.batches(["confirmed"])) == 3

    await tick_until(w, three_confirmed)
    assert (await kit.calls.get(third)).state == "settled"  # type: ignore[union-attr]
    assert await indexer.step() > 0  # the third batch's events (ChargesSettled and its credit)
    assert indexer.found == []
    # The escrow's views, read bare (`ChainReads.view`) by the account mirror, claims and audits,
    # are what web3 reads.
    f, client, spent = onchain.escrow.functions, kit.client, bytes.fromhex(digest[2:])
    assert await client.deposit_of(consumer.address) == f.deposits(consumer.address).call() > 0
    assert await client.withdrawal_of(consumer.address) == tuple(f.withdrawals(consumer.address).call())
    assert await client.permission_spent(spent) == f.permission_spent(spent).call() == total + 800
    assert await client.earnings_of(p2) == f.earnings(p2).call() > 0
    assert await client.is_revoked(consumer.address, spent) is False
    assert await client.fee_bps() == f.fee_bps().call() > 0
    assert await client.liabilities() == f.liabilities().call() > 0
    assert await client.is_operator(onchain.operator.address) and not await client.is_operator(p1)
    assert await client.paused() is False
    assert await client.reference_settled(bytes.fromhex(second.reference.removeprefix("0x")))
    assert not await client.reference_settled(b"\x01" * 32)


async def test_one_settlement_leader_per_database(kit: Kit) -> None:
    """SQLite: a lock file beside the database; PostgreSQL: a session advisory lock."""
    first, second = LeaderLock(kit.store.engine), LeaderLock(kit.store.engine)
    assert await first.acquire() and not await second.acquire()
    await first.release()
    assert await second.acquire()
    await second.release()


def test_quotra_reconcile_prints_discrepancies_and_exits_non_zero(onchain: OnChain, tmp_path: Any) -> None:
    from quotra.cli import main
    from quotra.store.db import create_engine, upgrade

    database_url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    env = {
        "QUOTRA_DATABASE_URL": database_url,
        "QUOTRA_CHAIN_RPC_URL": onchain.twin.rpc_url,
        "QUOTRA_ESCROW_ADDRESS": onchain.escrow.address,
        "QUOTRA_ESCROW_START_BLOCK": str(onchain.chain.w3.eth.block_number + 1),  # this test's blocks
        "QUOTRA_OPERATOR_KEY": "0x" + bytes(onchain.operator.key).hex(),
        "QUOTRA_LOG_JSON": "false",
        "QUOTRA_DATA_DIR": str(tmp_path / "data"),
    }

    async def setup() -> tuple[str, str]:
        engine = create_engine(database_url)
        await upgrade(engine)
        from quotra.calls.store import CallStore
        from quotra.store.repositories import Store
        from quotra.store.transactions import Transactions

        transactions = Transactions(engine)
        outbox = Outbox(engine, transactions)
        kit = Kit(onchain, Store(engine), CallStore(engine, transactions), outbox, None, None)  # type: ignore[arg-type]
        payer = onchain.funded_payer(USDC)
        rows = [await kit.captured(payer, Account.create().address, amount) for amount in (1_000, 2_000)]
        await transactions.close()
        await engine.dispose()
        return rows[0].call_id, rows[1].call_id

    call_id, refunded = asyncio.run(setup())
    runner = CliRunner()
    settle = runner.invoke(main, ["settle", "--once"], env=env, catch_exceptions=False)
    assert settle.exit_code == 0, settle.output
    clean = runner.invoke(main, ["reconcile"], env=env, catch_exceptions=False)
    assert clean.exit_code == 0, clean.output
    assert "0 discrepancies" in clean.output

    # `quotra refund CALL_ID`: through the escrow, once; the books still agree with the chain.
    refund = runner.invoke(main, ["refund", refunded, "--yes"], env=env, catch_exceptions=False)
    assert refund.exit_code == 0, refund.output
    assert "refunded in 0x" in refund.output
    again = runner.invoke(main, ["refund", refunded, "--yes"], env=env, catch_exceptions=False)
    assert again.exit_code != 0 and "nothing to refund" in again.output
    clean = runner.invoke(main, ["reconcile"], env=env, catch_exceptions=False)
    assert clean.exit_code == 0, clean.output
    assert "0 discrepancies" in clean.output

    async def break_books() -> None:
        engine = create_engine(database_url)
        from quotra.store.models import Call
        from sqlalchemy import update

        async with engine.begin() as connection:
            await connection.execute(update(Call).where(Call.id == call_id).values(state="voided"))
        await engine.dispose()

    asyncio.run(break_books())
    dirty = runner.invoke(main, ["reconcile"], env=env, catch_exceptions=False)
    assert dirty.exit_code == 1, dirty.output
    assert "credited_but_voided" in dirty.output and call_id in dirty.output
    assert "ledger_mismatch" in dirty.output  # the escrow credited a call the books no longer count


async def test_a_batchs_receipt_and_input_read_bare_are_what_web3_reads(kit: Kit) -> None:
    """The worker and the indexer read landed batches through `ChainReads` (web3's formatting of a
    receipt cost ~14 ms a batch): the same status, gas, block, events and credited authorizations."""
    provider = Account.create().address
    rows = [await kit.captured(kit.onchain.funded_payer(USDC), provider, 1_000 + i) for i in range(3)]
    w = worker(kit)

    async def done() -> bool:
        return await states(kit.outbox, *(r.call_id for r in rows)) == ["settled"] * 3

    await tick_until(w, done)
    tx_hash = (await kit.outbox.get_x402(rows[0].call_id)).tx_hash  # type: ignore[union-attr]
    assert tx_hash is not None
    bare = await kit.client.reads.receipt(tx_hash)
    by_web3 = await kit.client.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
    assert bare is not None
    for field in ("status", "gasUsed", "blockNumber", "transactionHash"):
        assert bare[field] == by_web3[field], field
    events = EscrowEvents(kit.client)
    assert events.from_receipt(bare) == events.from_receipt(by_web3) != []
    assert events.authorizations_used(bare) == events.authorizations_used(by_web3)
    assert len(events.authorizations_used(bare)) == 3
    transaction = await kit.client.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
    assert await kit.client.reads.transaction_input(tx_hash) == bytes(transaction["input"])
    assert await kit.client.reads.receipt("0x" + "00" * 32) is None  # not mined: None
