"""The escrow's events, followed from `chain_cursors`, and the audit of the calls against them.

`EscrowEvents` decodes the payment events (the settlement worker uses it to read its receipts and
to find an earlier credit of an authorization). `Indexer` follows them block range by block range:
a credit the worker has not recorded yet (it crashed after sending, say) is recorded here, once,
and anything the relay cannot account for is a `Discrepancy`. `audit` checks the database on its
own (calls unpaid or stuck), `full_check` against the chain (each provider's credits): `quotra
reconcile` prints them, `/metrics` counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from eth_utils import event_abi_to_log_topic, keccak, to_checksum_address

from quotra.calls.outbox import Outbox, X402Payment
from quotra.chain import merkle
from quotra.chain.addresses import checksum
from quotra.chain.client import EscrowClient
from quotra.chain.reads import ChainReadError
from quotra.metrics import Metrics
from quotra.money import split_fee

log = logging.getLogger("quotra.indexer")
# A reservation the sweeper should have voided this long ago is reported stuck.
STRANDED_AFTER: Final = 300.0

EVENTS: Final = (
    "Credited",
    "PaymentsSettled",
    "PaymentFailed",
    "PaymentReconciled",
    "PaymentRefunded",
    "ChargesSettled",
)
# USDC (FiatToken) logs this for every EIP-3009 authorization it executes.
AUTHORIZATION_USED: Final = "0x" + keccak(text="AuthorizationUsed(address,bytes32)").hex()


def _hex(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    text = str(value)
    return text if text.startswith("0x") else "0x" + text


def address_topic(address: str) -> str:
    return "0x" + "00" * 12 + address.lower().removeprefix("0x")


@dataclass(frozen=True)
class EscrowEvent:
    name: str
    args: dict[str, Any]
    tx_hash: str
    block: int
    log_index: int

    @property
    def key(self) -> tuple[str, str]:
        """(payer, nonce) of a payment event, as the x402 table stores them."""
        return checksum(self.args["payer"]), _hex(self.args["nonce"]).lower()


@dataclass(frozen=True)
class Credit:
    """One x402 payment the escrow credited (settled in a batch, or reconciled) or refunded. A
    credit carries what a refund must prove: its fee rate, its settlement's root and its proof.
    `amount` is what was charged (and split); a batch's credit also knows the `value` authorized,
    whose rest (`value - amount`) the escrow credited to the payer's deposit."""

    kind: str  # settled | reconciled | refunded
    payer: str
    nonce: str
    provider: str
    amount: int
    fee: int
    tx_hash: str
    block: int
    fee_bps: int | None = None
    root: bytes | None = None
    proof: tuple[bytes, ...] = ()
    value: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.payer, self.nonce

    def leaf(self) -> merkle.Credit:
        assert self.fee_bps is not None, "a refund event is no credit"
        return merkle.Credit(
            self.payer, bytes.fromhex(self.nonce[2:]), self.provider, self.amount, self.fee_bps
        )


@dataclass(frozen=True)
class Discrepancy:
    kind: str
    detail: str
    reference: str | None = None

    def __str__(self) -> str:
        ref = f" [{self.reference}]" if self.reference else ""
        return f"{self.kind}{ref}: {self.detail}"


def _credit(event: EscrowEvent, kind: str) -> Credit:
    payer, nonce = event.key
    credit = Credit(
        kind,
        payer,
        nonce,
        checksum(event.args["provider"]),
        int(event.args["amount"]),
        int(event.args["fee"]),
        event.tx_hash,
        event.block,
    )
    if kind == "reconciled":
        # A reconciled payment is committed alone: its root is its own leaf.
        bps = int(event.args["fee_bps"])
        leaf = merkle.Credit(payer, bytes.fromhex(nonce[2:]), credit.provider, credit.amount, bps).leaf
        credit = Credit(**{**credit.__dict__, "fee_bps": bps, "root": leaf})
    return credit


class EscrowEvents:
    """Decodes the escrow's payment events. A batch (`settle_authorizations`) logs one
    `PaymentsSettled` with its Merkle root and fee rate; its payments are read from the
    transaction's input, and those USDC executed (its `AuthorizationUsed` log in the same
    transaction) are the credited ones, in the order of the root's leaves."""

    # The worker (from its receipt) and the indexer (from the batch's event) both meet a landed
    # batch, in either order: whichever comes first reads its credits, the other reuses them. The
    # credits of the last few transactions are kept, by block (a transaction mined again in
    # another block is read again).
    RECENT: Final = 32

    def __init__(self, client: EscrowClient, start_block: int = 0) -> None:
        self.client = client
        self.start_block = start_block
        self._recent: OrderedDict[str, tuple[int, list[Credit]]] = OrderedDict()
        abis: dict[str, Any] = {
            str(item.get("name")): item for item in client.escrow.abi if item.get("type") == "event"
        }
        self.topics = {name: "0x" + event_abi_to_log_topic(abis[name]).hex() for name in EVENTS}
        self._decoders = {topic: getattr(client.escrow.events, name)() for name, topic in self.topics.items()}

    def decode(self, entry: Any) -> EscrowEvent | None:
        topics = entry.get("topics") or []
        if not topics or str(entry["address"]).lower() != self.client.escrow_address.lower():
            return None
        decoder = self._decoders.get(_hex(topics[0]))
        if decoder is None:
            return None
        data = decoder.process_log(entry)
        return EscrowEvent(
            data["event"], dict(data["args"]), _hex(entry["transactionHash"]), int(entry["blockNumber"]),
            int(entry["logIndex"]),
        )  # fmt: skip

    def from_receipt(self, receipt: Any) -> list[EscrowEvent]:
        return [e for e in (self.decode(entry) for entry in receipt["logs"]) if e is not None]

    def authorizations_used(self, receipt: Any) -> set[tuple[str, str]]:
        """(payer, nonce) of every authorization USDC executed in a transaction."""
        used: set[tuple[str, str]] = set()
        for entry in receipt["logs"]:
            topics = entry.get("topics") or []
            if (
                len(topics) == 3
                and str(entry["address"]).lower() == self.client.usdc_address.lower()
                and _hex(topics[0]) == AUTHORIZATION_USED
            ):
                used.add((checksum("0x" + _hex(topics[1])[-40:]), _hex(topics[2]).lower()))
        return used

    async def credits_in(
        self, tx_hash: str, receipt: Any = None, *, block: int | None = None
    ) -> list[Credit]:
        """The payments the escrow credited or refunded in one transaction (mined in `block`, if
        the caller knows it from the transaction's event)."""
        key = _hex(tx_hash).lower()
        recent = self._recent.get(key)
        if receipt is not None:
            block = int(receipt["blockNumber"])
        if recent is not None and recent[0] == block:
            return list(recent[1])
        if receipt is None:
            receipt = await self.client.reads.receipt(tx_hash)
            if receipt is None:
                raise ChainReadError(f"no receipt for {tx_hash}")
        credits = await self._credits_in(tx_hash, receipt)
        self._recent[key] = (int(receipt["blockNumber"]), credits)
        self._recent.move_to_end(key)
        while len(self._recent) > self.RECENT:
            self._recent.popitem(last=False)
        return list(credits)

    async def _credits_in(self, tx_hash: str, receipt: Any) -> list[Credit]:
        credits: list[Credit] = []
        events = self.from_receipt(receipt)
        for event in events:
            if event.name == "PaymentReconciled":
                credits.append(_credit(event, "reconciled"))
            elif event.name == "PaymentRefunded":
                credits.append(_credit(event, "refunded"))
        settled = [e for e in events if e.name == "PaymentsSettled" and int(e.args["count"]) > 0]
        if settled:
            credits.extend(await self._batch_credits(tx_hash, receipt, settled[0]))
        return credits

    async def _batch_credits(self, tx_hash: str, receipt: Any, summary: EscrowEvent) -> list[Credit]:
        """The payments one `settle_authorizations` credited, each with its proof in the root."""
        used = self.authorizations_used(receipt)
        bps = int(summary.args["fee_bps"])
        leaves: list[merkle.Credit] = []
        values: list[int] = []
        calldata = await self.client.reads.transaction_input(tx_hash)
        for fields in self.client.decode_settle_authorizations(calldata):
            payer, nonce = checksum(fields[0]), _hex(fields[6]).lower()
            if (payer, nonce) in used:
                used.discard((payer, nonce))  # a repeat in the same batch was refused
                nonce_bytes = bytes.fromhex(nonce[2:])
                # The leaf's amount is what the payment was charged (`Payment.charged`).
                leaves.append(merkle.Credit(payer, nonce_bytes, checksum(fields[1]), int(fields[3]), bps))
                values.append(int(fields[2]))
        hashes = [leaf.leaf for leaf in leaves]
        root = merkle.root(hashes)
        if root != bytes(summary.args["root"]):
            raise ValueError(f"the payments of {tx_hash} do not make its settlement root")
        block = int(receipt["blockNumber"])
        paths = merkle.proofs(hashes)
        return [
            Credit(
                "settled",
                leaf.payer,
                "0x" + leaf.nonce.hex(),
                leaf.provider,
                leaf.amount,
                split_fee(leaf.amount, bps),
                _hex(tx_hash),
                block,
                bps,
                root,
                tuple(paths[i]),
                values[i],
            )
            for i, leaf in enumerate(leaves)
        ]

    async def fetch(
        self, from_block: int, to_block: int | str, topics: list[Any] | None = None
    ) -> list[EscrowEvent]:
        params: dict[str, Any] = {
            "address": self.client.escrow_address,
            "fromBlock": from_block,
            "toBlock": to_block,
            "topics": topics or [list(self.topics.values())],
        }
        logs = await self.client.w3.eth.get_logs(params)  # type: ignore[arg-type]
        events = [e for e in (self.decode(entry) for entry in logs) if e is not None]
        return sorted(events, key=lambda e: (e.block, e.log_index))

    async def credit_of(self, payer: str, nonce: str) -> Credit | None:
        """The escrow's credit (settled, alone or in a batch, or reconciled) of one authorization."""
        nonce = nonce.lower()
        topics = [self.topics["PaymentReconciled"], address_topic(payer), None, nonce]
        events = await self.fetch(self.start_block, "latest", topics)
        if events:
            return _credit(events[0], "reconciled")
        logs = await self.client.w3.eth.get_logs(
            {
                "address": self.client.usdc_address,
                "fromBlock": self.start_block,
                "toBlock": "latest",
                "topics": [AUTHORIZATION_USED, address_topic(payer), nonce],
            }
        )
        for entry in logs:
            for credit in await self.credits_in(_hex(entry["transactionHash"])):
                if credit.key == (checksum(payer), nonce) and credit.kind != "refunded":
                    return credit
        return None

    async def charges_of(self, permission: str, reference: str) -> EscrowEvent | None:
        topics = [self.topics["ChargesSettled"], None, permission.lower(), reference.lower()]
        events = await self.fetch(self.start_block, "latest", topics)
        return events[0] if events else None


class Indexer:
    """Follows the escrow's payment events and keeps the database in step with them."""

    def __init__(
        self,
        outbox: Outbox,
        client: EscrowClient,
        metrics: Metrics | None = None,
        *,
        start_block: int = 0,
        confirmations: int = 0,
        chunk: int = 2_000,
        poll: float = 2.0,
        audit_every: float = 30.0,
        events: EscrowEvents | None = None,
    ) -> None:
        self.outbox = outbox
        self.client = client
        self.events = events or EscrowEvents(client, start_block)
        self.metrics = metrics
        self.start_block = start_block
        self.confirmations = confirmations
        self.chunk = chunk
        self.poll = poll
        self.audit_every = audit_every
        self.contract = client.escrow_address
        self.found: list[Discrepancy] = []
        # The head every event up to which this indexer applied: while the chain has no newer
        # block there is nothing to read, not even the cursor (an idle relay's polls stay cheap).
        self._applied_head: int | None = None

    def _report(self, found: Discrepancy) -> None:
        log.warning("reconcile discrepancy", extra={"kind": found.kind, "detail": found.detail})
        self.found.append(found)
        if self.metrics is not None:
            self.metrics.discrepancies.labels(found.kind).inc()

    async def step(self) -> int:
        """Reads the events of the blocks since the cursor; returns how many it applied."""
        head = await self.client.block_number() - self.confirmations
        if head == self._applied_head:
            return 0
        cursor = await self.outbox.cursor(self.contract)
        start = self.start_block if cursor is None else cursor + 1
        applied = 0
        while start <= head:
            end = min(head, start + self.chunk - 1)
            for event in await self.events.fetch(start, end):
                for found in await self.handle(event):
                    self._report(found)
                applied += 1
            await self.outbox.set_cursor(self.contract, end)
            start = end + 1
        self._applied_head = head
        return applied

    async def credits(self, event: EscrowEvent) -> list[Credit]:
        if event.name == "PaymentsSettled":
            credits = await self.events.credits_in(event.tx_hash, block=event.block)
            return [c for c in credits if c.kind == "settled"]
        kinds = {"PaymentReconciled": "reconciled", "PaymentRefunded": "refunded"}
        if event.name in kinds:
            return [_credit(event, kinds[event.name])]
        return []

    async def handle(self, event: EscrowEvent) -> list[Discrepancy]:
        """Records what one event says; discrepancies when the database cannot account for it."""
        if event.name == "ChargesSettled":
            reference = _hex(event.args["reference"]).lower()
            batch = await self.outbox.batch_by_reference(reference)
            if batch is None:
                return [Discrepancy("unknown_charges", f"ChargesSettled in {event.tx_hash}", reference)]
            if batch.amount != int(event.args["amount"]):
                return [
                    Discrepancy(
                        "charges_amount_mismatch",
                        f"batch {batch.id} is {batch.amount}, the escrow charged {event.args['amount']}",
                        reference,
                    )
                ]
            return []
        credits = await self.credits(event)
        rows = await self.outbox.find_x402_many((c.payer, c.nonce) for c in credits)
        found = []
        for credit in credits:
            result = await self.apply(credit, rows.get((credit.payer, credit.nonce.lower())))
            if result is not None:
                found.append(result)
        return found

    async def apply(self, credit: Credit, row: X402Payment | None) -> Discrepancy | None:
        """What one credit says of `row`, the call of its (payer, nonce) (None: no such call)."""
        if row is None:
            return Discrepancy(
                "unknown_payment", f"{credit.kind} {credit.payer} nonce {credit.nonce} in {credit.tx_hash}"
            )
        ref = row.call_id
        if (
            credit.amount != row.amount
            or credit.provider != checksum(row.provider)
            or credit.value not in (None, row.value)
        ):
            return Discrepancy(
                "payment_mismatch",
                f"{credit.kind} {credit.amount} of {credit.value} to {credit.provider}, "
                f"the relay captured {row.amount} of {row.value} for {row.provider}",
                ref,
            )
        if credit.kind == "refunded":
            if row.state != "refunded":
                return Discrepancy("refund_not_recorded", credit.tx_hash, ref)
            return None
        if row.state in ("captured", "settling", "reconciling"):
            # Credited on-chain before the worker recorded it (it crashed, or is just slower).
            await self.outbox.settle_x402(
                row.call_id,
                tx_hash=credit.tx_hash,
                fee=credit.fee,
                block=credit.block,
                reconciled=credit.kind == "reconciled",
            )
            return None
        if row.state in ("settled", "refunded"):
            # The call keeps the transaction that credited it (a refund does not replace it).
            if row.tx_hash and row.tx_hash.lower() != credit.tx_hash.lower() and credit.kind == "settled":
                return Discrepancy("credited_twice", f"also {credit.kind} in {credit.tx_hash}", ref)
            return None
        return Discrepancy(
            "credited_but_" + row.state, f"{credit.kind} in {credit.tx_hash} for a {row.state} call", ref
        )

    async def audit(self, now: float | None = None) -> list[Discrepancy]:
        """What the database says went wrong: calls served but never paid, payments that can no
        longer settle, reservations or batches stuck."""
        now = now or time.time()
        found: list[Discrepancy] = []
        for call_id, _state, error in await self.outbox.calls_in(["failed"], ["x402", "prepaid"]):
            found.append(Discrepancy("unpaid_call", error or "settlement failed", call_id))
        for row in await self.outbox.x402_in(["captured", "settling"]):
            if row.valid_before < now:
                found.append(Discrepancy("expired_unsettled", f"{row.state} past validBefore", row.call_id))
        for call_id, _state, _error in await self.outbox.stranded(now - STRANDED_AFTER):
            found.append(
                Discrepancy("stuck_reservation", "reserved past its deadline, never voided", call_id)
            )
        for batch in await self.outbox.batches(["pending", "submitted"]):
            if batch.created_at.timestamp() < now - 600:
                found.append(
                    Discrepancy(
                        "batch_stuck",
                        f"{batch.kind} batch {batch.status} for 10+ minutes",
                        f"batch_{batch.id}",
                    )
                )
        for batch in await self.outbox.batches(["failed"]):
            found.append(Discrepancy("batch_failed", batch.error or "", f"batch_{batch.id}"))
        return found

    async def full_check(self) -> list[Discrepancy]:
        """Everything from the escrow's first block: each x402 credit against its call, and each
        provider's `Credited` events (less refunds) against the calls the relay settled for it
        (for `quotra reconcile`)."""
        found: list[Discrepancy] = []
        head = await self.client.block_number()
        credited: dict[tuple[str, str], list[Credit]] = {}
        chain_totals: dict[str, list[int]] = {}
        start = self.start_block
        while start <= head:
            end = min(head, start + self.chunk - 1)
            for event in await self.events.fetch(start, end):
                found.extend(await self.handle(event))
                if event.name == "Credited":
                    totals = chain_totals.setdefault(to_checksum_address(event.args["provider"]), [0, 0])
                    totals[0] += int(event.args["amount"])
                    totals[1] += int(event.args["fee"])
                for credit in await self.credits(event):
                    if credit.kind == "refunded":
                        totals = chain_totals.setdefault(credit.provider, [0, 0])
                        totals[0] -= credit.amount
                        totals[1] -= credit.fee
                    else:
                        credited.setdefault(credit.key, []).append(credit)
            start = end + 1
        for key, items in credited.items():
            if len(items) > 1:
                found.append(Discrepancy("credited_twice", f"{key} credited {len(items)} times"))
        for row in await self.outbox.x402_in(["settled", "refunded"], limit=10**9):
            if (row.payer, row.nonce.lower()) not in credited:
                found.append(Discrepancy("settled_without_credit", "no credit on-chain", row.call_id))
        books = await self.outbox.credited_by_provider()
        for provider in sorted(set(chain_totals) | {to_checksum_address(p) for p in books}):
            chain = chain_totals.get(provider, [0, 0])
            ours = list(books.get(provider, books.get(provider.lower(), (0, 0))))
            if chain != ours:
                found.append(
                    Discrepancy(
                        "ledger_mismatch",
                        f"provider {provider}: calls settled {ours[0]} (fees {ours[1]}), "
                        f"escrow credited {chain[0]} (fees {chain[1]})",
                    )
                )
        found.extend(await self.audit())
        return found

    async def run(self, stop: asyncio.Event) -> None:
        last_audit = 0.0
        while not stop.is_set():
            try:
                await self.step()
                if time.monotonic() - last_audit >= self.audit_every:
                    last_audit = time.monotonic()
                    self._publish(await self.audit())
            except Exception:
                log.warning("indexer step failed; retrying", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll)

    def _publish(self, found: Iterable[Discrepancy]) -> None:
        if self.metrics is None:
            return
        counts: dict[str, int] = {}
        for item in found:
            counts[item.kind] = counts.get(item.kind, 0) + 1
        self.metrics.open_discrepancies.clear()
        for kind, count in counts.items():
            self.metrics.open_discrepancies.labels(kind).set(count)
