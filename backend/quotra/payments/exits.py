"""ETH-free exits: a consumer's signed withdrawal steps (EIP-712, EOA or ERC-1271), submitted by the
relayer.

`request` and `cancel` are relayed for free (they move no USDC); `withdraw` pays the relayer its
fee out of the amount paid out, after the escrow's withdrawal delay. The relay proposes the typed
data (the escrow's nonce for the consumer, a deadline, the relayer's current fee), checks a signed
step against the escrow before anything is sent, then waits (bounded) for the outcome, as for a
gasless deposit; the relayer's task id tells the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final

from eth_utils import to_checksum_address

from quotra.chain import eip712
from quotra.chain.client import EscrowClient
from quotra.chain.oneshot import UnknownTask
from quotra.chain.relayer import Relayer, RelayerError, Submission, TxState, wait_final
from quotra.errors import BadRequest, Forbidden, NotFound, ServiceUnavailable
from quotra.payments.claims import ClaimConflict, RelayerQuote, check_signature

# step -> (EIP-712 primary type, its amount field)
STEPS: Final = {
    "request": ("RequestWithdrawal", "amount"),
    "cancel": ("CancelWithdrawal", "amount"),
    "withdraw": ("Withdraw", "relayer_fee"),
}


class Exits:
    def __init__(
        self,
        escrow: EscrowClient,
        relayer: Relayer,
        quote: Callable[[], Awaitable[RelayerQuote]],
        *,
        ttl: int = 3600,
        wait_seconds: float = 10.0,
    ) -> None:
        self.escrow = escrow
        self.relayer = relayer
        self.quote = quote
        self.ttl = ttl
        self.wait_seconds = wait_seconds

    async def _state(self, wallet: str) -> dict[str, int]:
        block, deposit, (pending, unlock_at), nonce = await asyncio.gather(
            self.escrow.w3.eth.get_block("latest"),
            self.escrow.deposit_of(wallet),
            self.escrow.withdrawal_of(wallet),
            self.escrow.withdrawal_nonce(wallet),
        )
        return {
            "now": int(block["timestamp"]),
            "deposit": deposit,
            "pending": pending,
            "unlock_at": unlock_at,
            "nonce": nonce,
        }

    async def _value(self, step: str, state: dict[str, int], amount: int | None) -> int:
        """The signed amount of a step, checked against the escrow's state."""
        if step == "request":
            if amount is None or not 0 < amount <= state["deposit"]:
                raise BadRequest(
                    f"amount must be positive and at most the deposit ({state['deposit']} atomic USDC)",
                    code="invalid_amount",
                )
            return amount
        if state["pending"] == 0:
            raise ClaimConflict("No withdrawal is pending", code="no_pending_withdrawal")
        if step == "cancel":
            return state["pending"]
        if state["now"] < state["unlock_at"]:
            raise ClaimConflict(
                f"The withdrawal unlocks at {state['unlock_at']} (unix time)", code="withdrawal_locked"
            )
        fee = (await self.quote()).fee if amount is None else amount
        if fee >= state["pending"]:
            raise ClaimConflict(
                f"The relayer's fee {fee} is not below the pending amount {state['pending']}",
                code="amount_not_above_fee",
            )
        return fee

    async def typed_data(self, wallet: str, step: str, amount: int | None) -> dict[str, Any]:
        """The step to sign: `request` (of `amount`), `cancel` or `withdraw` (at the relayer's fee)."""
        primary, field = STEPS[step]
        wallet = to_checksum_address(wallet)
        state = await self._state(wallet)
        value = await self._value(step, state, amount if step == "request" else None)
        message = {
            "consumer": wallet,
            field: value,
            "nonce": state["nonce"],
            "deadline": state["now"] + self.ttl,
        }
        typed = eip712.typed_data(self.escrow.escrow_domain, primary, message)
        typed["message"] = {k: str(v) if isinstance(v, int) else v for k, v in message.items()}
        return {"step": step, "typed_data": typed, **state}

    async def submit(self, wallet: str, step: str, message: dict[str, Any], signature: str) -> dict[str, Any]:
        """Check a signed step against the escrow, send it through the relayer, wait (bounded)."""
        primary, field = STEPS[step]
        wallet = to_checksum_address(wallet)
        try:
            consumer = to_checksum_address(message["consumer"])
            value, nonce, deadline = (int(message[k]) for k in (field, "nonce", "deadline"))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"not a {primary} message: {exc}", code="invalid_message") from None
        if consumer != wallet:
            raise Forbidden("The withdrawal is another wallet's", code="not_your_withdrawal")
        signed = {"consumer": consumer, field: value, "nonce": nonce, "deadline": deadline}
        state, code = await asyncio.gather(self._state(wallet), self.escrow.code_at(wallet))
        check_signature(
            eip712.digest(self.escrow.escrow_domain, primary, signed), signature, wallet, bool(code)
        )
        if nonce != state["nonce"]:
            raise ClaimConflict(f"The escrow expects nonce {state['nonce']}", code="stale_nonce")
        if deadline <= state["now"]:
            raise BadRequest("The signed step has expired (deadline)", code="expired")
        if step == "withdraw":
            await self._value(step, state, value)
            quote = await self.quote()
            if value < quote.fee:
                raise BadRequest(
                    f"relayer_fee is below the relayer's fee {quote.fee}", code="relayer_fee_too_low"
                )
        elif step == "cancel" and value != state["pending"]:
            raise ClaimConflict(f"The pending amount is {state['pending']}", code="stale_amount")
        else:
            await self._value(step, state, value)
        raw = bytes.fromhex(signature.removeprefix("0x"))
        call = self.escrow.encode_withdrawal_step(primary, wallet, value, deadline, raw)
        try:
            sub = await self.relayer.send(call, memo=f"withdrawal:{wallet}:{nonce}")
        except RelayerError as exc:
            raise ServiceUnavailable(
                "The relayer is unavailable; try again", code="relayer_unavailable"
            ) from exc
        if sub.state is TxState.REJECTED:
            raise ClaimConflict(f"The relayer refused it: {sub.error}", code="withdrawal_refused")
        final = await wait_final(self.relayer, sub.id, within=self.wait_seconds, poll=0.1)
        return {"step": step, **self.status_of(final)}

    async def status(self, task_id: str) -> dict[str, Any]:
        try:
            return self.status_of(await self.relayer.status(task_id))
        except UnknownTask:
            raise NotFound(f"No withdrawal task {task_id}") from None
        except RelayerError as exc:
            raise ServiceUnavailable(f"The relayer cannot tell: {exc}", code="relayer_unavailable") from exc

    @staticmethod
    def status_of(sub: Submission) -> dict[str, Any]:
        status = {TxState.CONFIRMED: "confirmed", TxState.REVERTED: "failed", TxState.REJECTED: "failed"}
        return {
            "task_id": sub.id,
            "status": status.get(sub.state, "submitted"),
            "tx_hash": sub.tx_hash,
            "error": sub.error,
        }
