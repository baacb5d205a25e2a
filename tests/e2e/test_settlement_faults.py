"""The settlement worker against the twin when things go wrong: the RPC goes away, the process dies
after sending, an authorization is front-run, a payment is refunded; and prepaid charges."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from click.testing import CliRunner
from e2e_helpers import Kit, OnChain, provider_share
from eth_account import Account
from prometheus_client import generate_latest
from quotra.chain import eip712, twin
from quotra.chain.client import EscrowClient
from quotra.chain.escrow import sign_authorization
from quotra.chain.relayer import ChainCall, DirectRelayer, RelayerError, Submission
from quotra.metrics import Metrics
from quotra.payments.indexer import Indexer
from quotra.payments.settlement import LeaderLock, SettlementConfig, SettlementWorker
from quotra.store.models import ConsumerAccount, PrepaidCharge, SpendPermissionRecord
from quotra.store.payments_repo import PaymentsRepo
from web3 import AsyncHTTPProvider, AsyncWeb3

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
        kit.repo, client or kit.client, relayer or kit.relayer, FAST, start_block=kit.onchain.start_block
    )


async def statuses(repo: PaymentsRepo, *ids: int) -> list[str]:
    return [(await repo.get_x402(i)).status for i in ids]  # type: ignore[union-attr]


async def ledger(repo: PaymentsRepo, payment_id: int) -> list[str]:
    return [kind for kind, *_ in await repo.ledger_for(f"x402_{payment_id}")]


@contextlib.asynccontextmanager
async def forwarder(port: int, target_port: int) -> AsyncIterator[None]:
    """A TCP forwarder on `port` to the twin: the RPC "comes back" on the address the worker uses."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()


async def test_rpc_down_during_settlement_is_retried_and_settles_once_back(kit: Kit) -> None:
    earner = Account.create().address
    payer = kit.onchain.funded_payer(USDC)
    rows = [await kit.captured(payer, earner, 2_500) for _ in range(3)]
    port = twin.free_port()
    # web3's own retries (with backoff) would only make the outage longer to watch
    provider = AsyncHTTPProvider(f"http://127.0.0.1:{port}", exception_retry_configuration=None)
    dead = EscrowClient(
        AsyncWeb3(provider), escrow=kit.client.escrow_address, usdc=kit.client.usdc_address, chain_id=84532
    )
    w = worker(kit, dead, DirectRelayer(dead.w3, kit.onchain.operator, chain_id=84532))
    for _ in range(3):
        await w.tick()
        await asyncio.sleep(0.06)
    (batch,) = await kit.repo.batches(["pending"])
    assert batch.attempts >= 1 and batch.error and batch.tx_hash is None
    assert await statuses(kit.repo, *(r.id for r in rows)) == ["settling"] * 3
    assert kit.onchain.earnings(earner) == 0

    async with forwarder(port, kit.onchain.twin.port):

        async def all_settled() -> bool:
            return await statuses(kit.repo, *(r.id for r in rows)) == ["settled"] * 3

        await tick_until(w, all_settled)
    assert kit.onchain.earnings(earner) == 3 * provider_share(2_500)
    for row in rows:
        assert await ledger(kit.repo, row.id) == ["capture", "settle"]
    (confirmed,) = await kit.repo.batches(["confirmed"])
    assert confirmed.items == 3 and confirmed.gas_used


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
    (batch,) = await kit.repo.batches(["pending"])
    assert batch.attempts == 1 and batch.tx_hash is None  # the database never learnt the hash
    assert kit.onchain.earnings(provider) == provider_share(4_000)  # but it is on-chain

    restarted = worker(kit)  # a new process: checks the chain before sending again

    async def done() -> bool:
        return await statuses(kit.repo, row.id) == ["settled"]

    await tick_until(restarted, done)
    assert (await kit.repo.get_x402(row.id)).tx_hash == lost.sent[0].tx_hash  # type: ignore[union-attr]
    assert kit.onchain.earnings(provider) == provider_share(4_000)
    assert await ledger(kit.repo, row.id) == ["capture", "settle"]
    assert await kit.repo.batches(["pending", "submitted"]) == []


async def test_front_run_authorization_is_reconciled_once(kit: Kit) -> None:
    onchain = kit.onchain
    first_block = int(onchain.chain.w3.eth.block_number) + 1  # the twin is shared: index this test only
    provider = Account.create().address
    payer = onchain.funded_payer(USDC)
    front_run = await kit.captured(payer, provider, 5_000)
    normal = await kit.captured(payer, provider, 1_000)
    # A third party who saw the signature submits it to USDC first: the escrow gets the USDC uncredited.
    args = front_run.payment_args()
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
    w = worker(kit)

    async def done() -> bool:
        return await statuses(kit.repo, front_run.id, normal.id) == ["reconciled", "settled"]

    await tick_until(w, done)
    assert onchain.earnings(provider) == provider_share(5_000) + provider_share(1_000)
    assert await ledger(kit.repo, front_run.id) == ["capture", "reconcile"]
    # The operator paid the provider's credit; the front-run funds wait for the owner's sweep.
    assert onchain.balance(onchain.operator.address) == operator_usdc - 5_000
    assert onchain.excess() == excess
    assert onchain.solvent()
    for _ in range(3):  # nothing more happens
        await w.tick()
    assert onchain.earnings(provider) == provider_share(5_000) + provider_share(1_000)
    assert await ledger(kit.repo, front_run.id) == ["capture", "reconcile"]
    indexer = Indexer(kit.repo, kit.client, start_block=first_block)
    await indexer.step()
    assert indexer.found == []


async def test_settled_payment_is_refunded_through_the_escrow(kit: Kit) -> None:
    first_block = int(kit.onchain.chain.w3.eth.block_number) + 1
    provider = Account.create().address
    payer = kit.onchain.funded_payer(USDC)
    row = await kit.captured(payer, provider, 7_000)
    w = worker(kit)

    async def done() -> bool:
        return await statuses(kit.repo, row.id) == ["settled"]

    await tick_until(w, done)
    paid = kit.onchain.balance(payer.address)
    tx_hash = await w.refund(row.id)
    assert tx_hash.startswith("0x")
    assert kit.onchain.balance(payer.address) == paid + 7_000
    assert kit.onchain.earnings(provider) == 0
    assert await statuses(kit.repo, row.id) == ["refunded"]
    assert await ledger(kit.repo, row.id) == ["capture", "settle", "refund"]
    with pytest.raises(RelayerError):
        await w.refund(row.id)  # once only
    indexer = Indexer(kit.repo, kit.client, start_block=first_block)
    assert await indexer.full_check() == []


async def test_expired_authorization_fails_and_is_reported(kit: Kit) -> None:
    payer = kit.onchain.funded_payer(USDC)
    row = await kit.captured(payer, Account.create().address, 1_000, valid_for=5)
    await worker(kit).tick()  # expires within min_validity: never sent
    assert await statuses(kit.repo, row.id) == ["failed"]
    metrics = Metrics()
    indexer = Indexer(kit.repo, kit.client, metrics, start_block=kit.onchain.start_block)
    found = await indexer.audit()
    assert [d.kind for d in found] == ["unpaid_call"] and found[0].reference == f"x402_{row.id}"
    indexer._publish(found)  # what the app's indexer does after each audit: /metrics shows it
    text = generate_latest(metrics.registry).decode()
    assert 'quotra_reconcile_open_discrepancies{kind="unpaid_call"} 1.0' in text


async def test_prepaid_charges_settle_per_permission_in_order(kit: Kit) -> None:
    onchain = kit.onchain
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
    }
    domain = eip712.escrow_domain(84532, onchain.escrow.address)
    digest = "0x" + eip712.digest(domain, "SpendPermission", permission).hex()
    signature = eip712.sign(consumer.key, domain, "SpendPermission", permission)
    p1, p2 = Account.create().address, Account.create().address
    first = [(p1, 1_234)] * 3 + [(p2, 777)] * 2
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
                permission_allowance=3 * USDC, permission_spent=0, reserved=0,
                unsettled=sum(a for _, a in first),
            )
        )  # fmt: skip
        for provider, amount in first:
            session.add(
                PrepaidCharge(
                    consumer=consumer.address, api_key_id="key_1", permission_digest=digest,
                    listing_id="lst_1", provider=provider, reserved_amount=amount, amount=amount,
                    status="captured",
                )
            )  # fmt: skip
    w = worker(kit)

    async def batch_confirmed() -> bool:
        return len(await kit.repo.batches(["confirmed"])) == 1

    await tick_until(w, batch_confirmed)
    (batch,) = await kit.repo.batches(["confirmed"])
    assert batch.kind == "charges" and batch.items == 5
    share1, share2 = provider_share(3 * 1_234), provider_share(2 * 777)
    assert (onchain.earnings(p1), onchain.earnings(p2)) == (share1, share2)
    total = 3 * 1_234 + 2 * 777
    assert onchain.escrow.functions.permission_spent(bytes.fromhex(digest[2:])).call() == total
    sums = await kit.repo.ledger_sums("prepaid")
    assert sums[("settle", p1)] == (3 * 1_234, 3 * 1_234 - share1)
    assert sums[("settle", p2)] == (2 * 777, 2 * 777 - share2)
    async with kit.store.sessions() as session:
        account = await session.get(ConsumerAccount, consumer.address)
        assert (account.unsettled, account.permission_spent, account.deposit) == (0, total, 5 * USDC - total)

    # A second batch under the same permission, under its own reference.
    async with kit.store.sessions.begin() as session:
        session.add(
            PrepaidCharge(
                consumer=consumer.address, api_key_id="key_1", permission_digest=digest, listing_id="lst_1",
                provider=p2, reserved_amount=500, amount=500, status="captured",
            )
        )  # fmt: skip

    async def two_confirmed() -> bool:
        return len(await kit.repo.batches(["confirmed"])) == 2

    await tick_until(w, two_confirmed)
    second = (await kit.repo.batches(["confirmed"]))[-1]
    assert second.reference != batch.reference
    assert onchain.earnings(p2) == share2 + provider_share(500)
    assert onchain.solvent()


async def test_one_settlement_leader_per_sqlite_database(kit: Kit) -> None:
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

    async def setup() -> int:
        engine = create_engine(database_url)
        await upgrade(engine)
        from quotra.store.repositories import Store

        kit = Kit(onchain, Store(engine), PaymentsRepo(Store(engine)), None, None)  # type: ignore[arg-type]
        payer = onchain.funded_payer(USDC)
        row = await kit.captured(payer, Account.create().address, 1_000)
        await engine.dispose()
        return row.id

    payment_id = asyncio.run(setup())
    runner = CliRunner()
    settle = runner.invoke(main, ["settle", "--once"], env=env, catch_exceptions=False)
    assert settle.exit_code == 0, settle.output
    clean = runner.invoke(main, ["reconcile"], env=env, catch_exceptions=False)
    assert clean.exit_code == 0, clean.output
    assert "0 discrepancies" in clean.output

    async def break_books() -> None:
        engine = create_engine(database_url)
        from quotra.store.models import X402Payment
        from sqlalchemy import update

        async with engine.begin() as connection:
            await connection.execute(
                update(X402Payment).where(X402Payment.id == payment_id).values(status="voided")
            )
        await engine.dispose()

    asyncio.run(break_books())
    dirty = runner.invoke(main, ["reconcile"], env=env, catch_exceptions=False)
    assert dirty.exit_code == 1, dirty.output
    assert "credited_but_voided" in dirty.output and f"x402_{payment_id}" in dirty.output
