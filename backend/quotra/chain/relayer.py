"""Getting a call on-chain and learning what happened to it: one interface, several relayers.

`DirectRelayer` signs with a key the relay holds (the operator's settling key: escrow
settlement is operator-only) and submits with web3.py: nonces handed out locally, gas
estimated (a call that would revert is refused before anything is sent), EIP-1559 fees,
stuck transactions replaced with bumped fees, receipts read back. The 1Shot-style client
for the permissionless relayer (ETH-free claims and deposits) implements the same
`Relayer` protocol in `quotra.chain.oneshot`.

Status codes follow the 1Shot relayer's: 100 pending, 110 submitted, 200 confirmed,
400 rejected (never sent), 500 reverted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, Protocol

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.exceptions import ContractLogicError, Web3RPCError
from web3.types import RPCEndpoint

from quotra.chain.delegation import (
    Execution,
    Redemption,
    SetCodeAuthorization,
    describe_revert,
    encode_redeem,
)
from quotra.chain.reads import receipt_of

log = logging.getLogger("quotra.relayer")


class TxState(IntEnum):
    PENDING = 100
    SUBMITTED = 110
    CONFIRMED = 200
    REJECTED = 400
    REVERTED = 500

    @property
    def final(self) -> bool:
        return self >= TxState.CONFIRMED


@dataclass(frozen=True)
class ChainCall:
    """A contract call to put on-chain: target, calldata, and a label for logs.

    An ERC-7710 redemption (`DelegationManager.redeemDelegations`) also carries its entries, which
    a 1Shot-style relayer takes as `{permissionContext, executions}` transactions, and any EIP-7702
    authorizations to apply first (a type-4 transaction: an account becomes a smart account).
    """

    to: str
    data: bytes
    label: str = ""
    gas: int | None = None
    redemptions: tuple[Redemption, ...] = ()
    authorizations: tuple[SetCodeAuthorization, ...] = ()

    @classmethod
    def redeem(
        cls,
        delegation_manager: str,
        entries: Sequence[Redemption],
        *,
        label: str,
        authorizations: Sequence[SetCodeAuthorization] = (),
    ) -> ChainCall:
        return cls(
            to=delegation_manager,
            data=encode_redeem(entries),
            label=label,
            redemptions=tuple(entries),
            authorizations=tuple(authorizations),
        )

    def redemption_json(self) -> str:
        """A redemption as JSON (its entries and authorizations), to resend exactly what was signed."""
        entries = [
            {"context": "0x" + e.context.hex(), "executions": [x.as_json() for x in e.executions]}
            for e in self.redemptions
        ]
        return json.dumps({"entries": entries, "authorizations": [a.as_json() for a in self.authorizations]})

    @classmethod
    def from_redemption_json(cls, delegation_manager: str, text: str, *, label: str) -> ChainCall:
        """The call `redemption_json` wrote."""
        raw = json.loads(text)
        entries = [
            Redemption(
                bytes.fromhex(e["context"][2:]),
                tuple(
                    Execution(x["target"], bytes.fromhex(x["data"][2:]), int(x["value"]))
                    for x in e["executions"]
                ),
            )
            for e in raw["entries"]
        ]
        auths = [SetCodeAuthorization.from_json(a) for a in raw["authorizations"]]
        return cls.redeem(delegation_manager, entries, label=label, authorizations=auths)


@dataclass(frozen=True)
class Submission:
    """What a relayer knows about one call it was given."""

    id: str
    state: TxState
    tx_hash: str | None = None
    block_number: int | None = None
    gas_used: int | None = None
    error: str | None = None
    memo: str | None = None
    # The mined transaction's receipt, when the relayer read it itself (the direct relayer does):
    # whoever follows the submission need not read it again.
    receipt: Any = field(default=None, repr=False, compare=False)


class RelayerError(Exception):
    """The relayer could not be reached or did not answer sensibly (retry later)."""


class Relayer(Protocol):
    name: str

    async def send(self, call: ChainCall, *, memo: str | None = None) -> Submission: ...

    async def status(self, submission_id: str) -> Submission: ...


async def wait_final(
    relayer: Relayer, submission_id: str, *, within: float = 60.0, poll: float = 0.25
) -> Submission:
    """Poll a submission until it is final or `within` seconds pass (then return the last state)."""
    deadline = time.monotonic() + within
    while True:
        sub = await relayer.status(submission_id)
        if sub.state.final or time.monotonic() >= deadline:
            return sub
        await asyncio.sleep(poll)


def revert_reason(exc: BaseException) -> str:
    """The contract's revert string when the node gave one (a custom error of the Delegation
    Framework by its name), else the error text."""
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
        return describe_revert(data)
    if isinstance(exc, ContractLogicError) and exc.message:
        return exc.message.removeprefix("execution reverted: ")
    return str(exc) or type(exc).__name__


@dataclass
class _Pending:
    submission: Submission
    tx: dict[str, Any]
    sent_at: float = field(default_factory=time.monotonic)
    # Every hash broadcast for this nonce: after a replacement either one may be mined.
    hashes: list[str] = field(default_factory=list)


class DirectRelayer:
    """Submits transactions signed by a local key (never logged, never written to disk here)."""

    name = "direct"

    def __init__(
        self,
        w3: AsyncWeb3,
        account: LocalAccount,
        *,
        chain_id: int,
        gas_margin: float = 1.25,
        replace_after: float = 30.0,
        fee_bump: float = 1.25,
    ) -> None:
        self.w3 = w3
        self.account = account
        self.address = account.address
        self.chain_id = chain_id
        self.gas_margin = gas_margin
        self.replace_after = replace_after
        self.fee_bump = fee_bump
        self._nonce: int | None = None
        self._lock = asyncio.Lock()
        self._subs: dict[str, _Pending] = {}

    async def _fees(self) -> tuple[int, int]:
        block = await self.w3.eth.get_block("pending")
        base = int(block.get("baseFeePerGas") or 0)
        try:
            tip = int(await self.w3.eth.max_priority_fee)
        except (Web3RPCError, ValueError):
            tip = 1_000_000  # 0.001 gwei: Base's usual tip
        return 2 * base + tip, tip

    async def send(self, call: ChainCall, *, memo: str | None = None) -> Submission:
        sub_id = uuid.uuid4().hex
        tx: dict[str, Any] = {"from": self.address, "to": call.to, "data": HexBytes(call.data), "value": 0}
        if call.authorizations:
            tx["authorizationList"] = [a.as_tx() for a in call.authorizations]
        try:
            gas = call.gas or int(await self.w3.eth.estimate_gas(tx) * self.gas_margin)  # type: ignore[arg-type]
        except (ContractLogicError, Web3RPCError, ValueError) as exc:
            sub = Submission(sub_id, TxState.REJECTED, error=revert_reason(exc), memo=memo)
            self._subs[sub_id] = _Pending(sub, tx)
            log.info("relayer.rejected", extra={"label": call.label, "reason": sub.error})
            return sub
        max_fee, tip = await self._fees()
        async with self._lock:
            if self._nonce is None:
                self._nonce = await self.w3.eth.get_transaction_count(self.address, "pending")
            tx.update(
                gas=gas,
                maxFeePerGas=max_fee,
                maxPriorityFeePerGas=tip,
                nonce=self._nonce,
                chainId=self.chain_id,
                type=4 if call.authorizations else 2,
            )
            try:
                tx_hash = await self._broadcast(tx)
            except (Web3RPCError, ValueError) as exc:
                # Nothing was accepted: resynchronise the nonce from the node next time.
                self._nonce = None
                raise RelayerError(f"could not broadcast {call.label or 'transaction'}: {exc}") from exc
            self._nonce += 1
        sub = Submission(sub_id, TxState.SUBMITTED, tx_hash=tx_hash, memo=memo)
        self._subs[sub_id] = _Pending(sub, tx, hashes=[tx_hash])
        log.info("relayer.submitted", extra={"label": call.label, "tx": tx_hash})
        return sub

    async def upgrade_self(self, implementation: str) -> Submission:
        """Make this relayer's own account an EIP-7702 smart account delegating to `implementation`
        (a type-4 transaction to itself; a self-sent authorization carries the next nonce but one)."""
        max_fee, tip = await self._fees()
        async with self._lock:
            if self._nonce is None:
                self._nonce = await self.w3.eth.get_transaction_count(self.address, "pending")
            signed = self.account.sign_authorization(
                {"chainId": self.chain_id, "address": implementation, "nonce": self._nonce + 1}
            )
            tx: dict[str, Any] = {
                "from": self.address,
                "to": self.address,
                "data": b"",
                "value": 0,
                "gas": 100_000,
                "maxFeePerGas": max_fee,
                "maxPriorityFeePerGas": tip,
                "nonce": self._nonce,
                "chainId": self.chain_id,
                "type": 4,
                "authorizationList": [signed],
            }
            try:
                tx_hash = await self._broadcast(tx)
            except (Web3RPCError, ValueError) as exc:
                self._nonce = None
                raise RelayerError(f"could not broadcast the EIP-7702 upgrade: {exc}") from exc
            self._nonce += 1
        sub = Submission(uuid.uuid4().hex, TxState.SUBMITTED, tx_hash=tx_hash, memo="eip7702-upgrade")
        self._subs[sub.id] = _Pending(sub, tx, hashes=[tx_hash])
        return sub

    async def _broadcast(self, tx: dict[str, Any]) -> str:
        signed = self.account.sign_transaction(tx)
        return "0x" + bytes(await self.w3.eth.send_raw_transaction(signed.raw_transaction)).hex()

    async def status(self, submission_id: str) -> Submission:
        pending = self._subs.get(submission_id)
        if pending is None:
            raise RelayerError(f"unknown submission {submission_id}")
        sub = pending.submission
        if sub.state.final or sub.tx_hash is None:
            return sub
        receipt = None
        for tx_hash in reversed(pending.hashes):
            # Read raw, without web3's formatting of a batch's hundreds of logs (reads.py).
            answer = await self.w3.provider.make_request(RPCEndpoint("eth_getTransactionReceipt"), [tx_hash])
            if "error" in answer:
                raise RelayerError(f"eth_getTransactionReceipt: {answer['error']!r}")
            receipt = receipt_of(answer.get("result"))
            if receipt is not None:
                break
        if receipt is None:
            if time.monotonic() - pending.sent_at > self.replace_after:
                await self._replace(pending)
            return pending.submission
        state = TxState.CONFIRMED if receipt["status"] == 1 else TxState.REVERTED
        sub = replace(
            sub,
            state=state,
            tx_hash="0x" + bytes(receipt["transactionHash"]).hex(),
            block_number=receipt["blockNumber"],
            gas_used=receipt["gasUsed"],
            error=None if state is TxState.CONFIRMED else "reverted",
            receipt=receipt,
        )
        pending.submission = sub
        return sub

    async def _replace(self, pending: _Pending) -> None:
        """Resend a stuck transaction with the same nonce and fees bumped past the node's minimum."""
        tx = dict(pending.tx)
        max_fee, tip = await self._fees()
        tx["maxPriorityFeePerGas"] = max(int(tx["maxPriorityFeePerGas"] * self.fee_bump), tip)
        tx["maxFeePerGas"] = max(int(tx["maxFeePerGas"] * self.fee_bump), max_fee, tx["maxPriorityFeePerGas"])
        try:
            tx_hash = await self._broadcast(tx)
        except (Web3RPCError, ValueError) as exc:
            # "nonce too low": the original was mined meanwhile; its receipt will show up.
            log.info("relayer.replace_skipped", extra={"reason": str(exc)})
            pending.sent_at = time.monotonic()
            return
        log.warning("relayer.replaced", extra={"old": pending.submission.tx_hash, "new": tx_hash})
        pending.tx = tx
        pending.sent_at = time.monotonic()
        pending.hashes.append(tx_hash)
        pending.submission = replace(pending.submission, tx_hash=tx_hash)
