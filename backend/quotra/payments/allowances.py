"""Auto top-up of a consumer's prepaid deposit under its periodic USDC allowance (ERC-7715 style).

A consumer whose account is a MetaMask smart account grants the relay's operator an
`erc20-token-periodic` permission: one Delegation Framework delegation with an
`ERC20PeriodTransferEnforcer` on USDC (what MetaMask's `wallet_requestExecutionPermissions`, formerly
`wallet_grantPermissions`, returns as the permission `context`). The relay checks the context
(`quotra.chain.delegation.read_allowance`) and keeps it. Whenever the consumer's available deposit
(deposit less a pending withdrawal) is below the low-water mark, the operator redeems what the
current period still allows (the enforcer's own `getAvailableAmount`: never more than the period
amount per period) in one `redeemDelegations`: the consumer's account transfers the USDC to the
operator's smart account, which approves and deposits it for the consumer. The operator's account
becomes MetaMask's stateless DeleGator (EIP-7702) on its first top-up. A consumer revokes with
the framework's `disableDelegation` (`POST /v1/delegations/disable`, no ETH).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any, Final

from eth_abi import encode as abi_encode
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3.types import BlockIdentifier

from quotra.chain import delegation as dlg
from quotra.chain.client import EscrowClient
from quotra.chain.deployment import DelegationFramework
from quotra.chain.relayer import ChainCall, DirectRelayer, Relayer, RelayerError, TxState, wait_final
from quotra.errors import BadRequest, chain_read
from quotra.payments.claims import ClaimConflict, check_signature, delegation_disabled, poll_forever
from quotra.store.allowances_repo import AllowancesRepo, AllowanceView

log = logging.getLogger("quotra.allowances")

TRANSFERRED_IN_PERIOD: Final = HexBytes(
    keccak(
        text="TransferredInPeriod(address,address,bytes32,address,uint256,uint256,uint256,uint256,uint256)"
    )
)


class AllowanceService:
    def __init__(
        self,
        repo: AllowancesRepo,
        escrow: EscrowClient,
        framework: DelegationFramework,
        operator: str,
        sender: Callable[[], Relayer | None],
        *,
        low_water: int,
        poll_seconds: float = 30.0,
        wait_seconds: float = 120.0,
        from_block: int = 0,
    ) -> None:
        self.repo = repo
        self.escrow = escrow
        self.framework = framework
        self.operator = to_checksum_address(operator)
        self.sender = sender  # the operator's own DirectRelayer (shared: one nonce sequence)
        self.low_water = low_water
        self.poll_seconds = poll_seconds
        self.wait_seconds = wait_seconds
        self.from_block = from_block  # where the escrow's deployment starts: no top-up before it

    async def _now(self) -> int:
        return int((await self.escrow.w3.eth.get_block("latest"))["timestamp"])

    async def typed_data(
        self, wallet: str, *, period_amount: int, period_duration: int, start: int | None, expiry: int
    ) -> dict[str, Any]:
        """The periodic allowance for `wallet` to sign (`eth_signTypedData_v4`), as MetaMask's
        `erc20-token-periodic` grant is built; periods start at `start` (default: now)."""
        now = await self._now()
        start = now if start is None else start
        if expiry <= max(now, start):
            raise BadRequest("The expiry must be after the start, in the future", code="invalid_permission")
        grant = dlg.periodic_allowance(
            self.framework,
            consumer=to_checksum_address(wallet),
            delegate=self.operator,
            usdc=self.escrow.usdc_address,
            period_amount=period_amount,
            period_duration=period_duration,
            start=start,
            expiry=expiry,
            salt=secrets.randbits(64),
        )
        domain = dlg.domain(self.escrow.chain_id, self.framework.delegation_manager)
        return {"typed_data": grant.typed_data(domain), "hash": "0x" + grant.hash.hex()}

    async def register(self, wallet: str, context: bytes) -> AllowanceView:
        """Check a consumer's permission context and keep it for top-ups."""
        fw, wallet = self.framework, to_checksum_address(wallet)
        try:
            allowance = dlg.read_allowance(
                fw, context, consumer=wallet, delegate=self.operator, usdc=self.escrow.usdc_address
            )
        except dlg.DelegationError as exc:
            raise BadRequest(str(exc), code="invalid_permission") from None
        code, now, disabled = await asyncio.gather(
            self.escrow.code_at(wallet), self._now(), delegation_disabled(self.escrow, fw, allowance.hash)
        )
        if not code:
            raise BadRequest(
                "The account is not a smart account (EIP-7702 to MetaMask's stateless DeleGator): "
                "its delegations cannot be redeemed",
                code="not_a_smart_account",
            )
        contract_wallet = not dlg.is_delegated_to(code, fw.stateless_delegator)
        digest = allowance.delegation.digest(dlg.domain(self.escrow.chain_id, fw.delegation_manager))
        check_signature(digest, "0x" + allowance.delegation.signature.hex(), wallet, contract_wallet)
        if disabled:
            raise ClaimConflict("The permission has been disabled", code="permission_revoked")
        if allowance.expiry is not None and allowance.expiry <= now:
            raise BadRequest("The permission has expired", code="permission_expired")
        period = allowance.period
        if period.amount <= 0 or period.duration <= 0:
            raise BadRequest("The period amount and duration must be positive", code="invalid_permission")
        return await self.repo.save(
            hash="0x" + allowance.hash.hex(),
            wallet=wallet,
            context="0x" + context.hex(),
            period_amount=period.amount,
            period_duration=period.duration,
            start_date=period.start,
            expiry=allowance.expiry,
        )

    async def available(self, allowance: AllowanceView, block: BlockIdentifier = "latest") -> int:
        """What the allowance still lets the relay take in the current period (the enforcer's view),
        as of `block`."""
        terms = dlg.erc20_period_transfer(
            self.escrow.usdc_address, allowance.period_amount, allowance.period_duration, allowance.start_date
        )
        args = [bytes.fromhex(allowance.hash[2:]), self.framework.delegation_manager, terms]
        data = dlg.PERIOD_AVAILABLE + abi_encode(["bytes32", "address", "bytes"], args)
        enforcer = self.framework.address("ERC20PeriodTransferEnforcer")
        raw = await self.escrow.w3.eth.call({"to": enforcer, "data": HexBytes(data)}, block)
        return int.from_bytes(bytes(raw)[:32], "big")

    def _operator(self) -> DirectRelayer:
        sender = self.sender()
        if not isinstance(sender, DirectRelayer) or sender.address != self.operator:
            raise RelayerError("top-ups need the operator's key (QUOTRA_OPERATOR_KEY) with settlement on")
        return sender

    async def _operator_ready(self, operator: DirectRelayer) -> None:
        """The operator's account must be a DeleGator to deposit in the redemption: upgrade it once."""
        if dlg.is_delegated_to(
            await self.escrow.code_at(operator.address), self.framework.stateless_delegator
        ):
            return
        sub = await operator.upgrade_self(self.framework.stateless_delegator)
        final = await wait_final(operator, sub.id, within=self.wait_seconds)
        if final.state is not TxState.CONFIRMED:
            raise RelayerError(
                f"the operator's EIP-7702 upgrade did not confirm: {final.error or final.state.name}"
            )

    async def top_up(self, allowance: AllowanceView) -> int:
        """Top the consumer's deposit up if it is below the low-water mark; the amount deposited."""
        wallet = allowance.wallet
        deposit, (pending, _unlock), left, balance = await asyncio.gather(
            self.escrow.deposit_of(wallet),
            self.escrow.withdrawal_of(wallet),
            self.available(allowance),
            self.escrow.usdc_balance(wallet),
        )
        if deposit - pending >= self.low_water:
            return 0
        amount = min(left, allowance.period_amount, balance)
        if amount <= 0:
            return 0
        operator = self._operator()
        await self._operator_ready(operator)
        entries = dlg.top_up_redemptions(
            bytes.fromhex(allowance.context[2:]),
            usdc=self.escrow.usdc_address,
            escrow=self.escrow.escrow_address,
            operator=operator.address,
            consumer=wallet,
            amount=amount,
        )
        call = ChainCall.redeem(self.framework.delegation_manager, entries, label="allowance top-up")
        sub = await operator.send(call, memo=f"topup:{allowance.hash}")
        final = sub if sub.state.final else await wait_final(operator, sub.id, within=self.wait_seconds)
        if final.state is not TxState.CONFIRMED:
            await self.repo.outcome(allowance.hash, error=final.error or f"top-up {final.state.name.lower()}")
            if await delegation_disabled(self.escrow, self.framework, bytes.fromhex(allowance.hash[2:])):
                await self.repo.revoke(allowance.hash)  # disabled from the wallet: stop trying
            return 0
        await self.repo.outcome(allowance.hash, error=None)
        log.info("allowances.topped_up", extra={"wallet": wallet, "amount": amount, "tx": final.tx_hash})
        return amount

    async def poll_once(self) -> int:
        """One round over the active allowances; the total deposited."""
        total = 0
        unrevoked = await self.repo.unrevoked()
        if not unrevoked:  # the chain's time is read only when there is something to top up
            return 0
        now = await self._now()
        for allowance in (a for a in unrevoked if a.expiry is None or a.expiry > now):
            try:
                total += await self.top_up(allowance)
            except Exception as exc:  # one consumer's trouble must not stop the others
                log.warning(
                    "allowances.top_up_failed", extra={"wallet": allowance.wallet, "error": str(exc)[:200]}
                )
                await self.repo.outcome(allowance.hash, error=str(exc))
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Top-ups every `poll_seconds`, until `stop` is set."""
        await poll_forever(self.poll_once, self.poll_seconds, stop, "allowances.poll_failed")

    async def top_ups(self, allowance: AllowanceView, block: BlockIdentifier = "latest") -> list[int] | None:
        """The amounts the relay took under the allowance up to `block`, one per top-up, from the
        enforcer's `TransferredInPeriod` events (None if the node serves no logs)."""
        try:
            logs = await self.escrow.w3.eth.get_logs(
                {
                    "address": to_checksum_address(self.framework.address("ERC20PeriodTransferEnforcer")),
                    "fromBlock": self.from_block,
                    "toBlock": block,
                    "topics": [TRANSFERRED_IN_PERIOD, None, None, HexBytes(allowance.hash)],
                }
            )
        except Exception as exc:  # a node without log filters
            log.info("allowances.logs_unavailable", extra={"error": str(exc)[:200]})
            return None
        amounts, last_period, last_total = [], None, 0
        for entry in logs:
            # data: token, periodAmount, periodDuration, startDate, transferredInCurrentPeriod, timestamp
            words = [int.from_bytes(bytes(entry["data"])[i : i + 32], "big") for i in range(0, 192, 32)]
            duration, start, total, at = words[2], words[3], words[4], words[5]
            period = (at - start) // duration if duration else 0
            amounts.append(total - last_total if period == last_period else total)
            last_period, last_total = period, total
        return amounts

    async def state(self, allowance: AllowanceView) -> tuple[int, list[int] | None]:
        """What the current period still allows and the top-ups made, both as of one block (read
        at "latest" each, a top-up landing between the two reads showed in one and not the other)."""
        with chain_read():
            block = await self.escrow.block_number()
            left = await self.available(allowance, block)
        return left, await self.top_ups(allowance, block)

    async def of_wallet(self, wallet: str) -> list[dict[str, Any]]:
        """The wallet's allowances, each with what the current period still allows and the
        top-ups made under it."""
        out = []
        for allowance in await self.repo.of_wallet(to_checksum_address(wallet)):
            left, top_ups = await self.state(allowance)
            out.append({"allowance": allowance, "available": left, "top_ups": top_ups})
        return out
