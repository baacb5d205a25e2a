"""ETH-free claims and gasless revocations through the configured relayer, tracked to the end.

A provider signs a `Delegation`; the relay checks it against the escrow (signature, payee, cap,
expiry, revocation, earnings, the relayer's fee) before anything is sent, records the claim, and
hands `claim_with_delegation` to the relayer with the claim id as memo. Webhooks (verified in
`quotra.webhooks`) move the claim on; a poller asks the relayer, and failing that the chain, about
claims no webhook finished. A resend reuses the claim's relayer task id, so a relayer that is slow,
down or restarted never executes a claim twice (and a delegation proposed by the relay caps
exactly one claim: `max_amount == amount`).

A provider whose account is a MetaMask smart account (an EIP-7702 upgraded EOA) may instead sign
framework `Delegation`s (ERC-7710): one allowing exactly `escrow.claim(amount <= cap, payee)`
once before an expiry, one paying the relayer's fee in USDC. The relay checks them the same way and
hands the relayer one `redeemDelegations` (with the account's EIP-7702 authorization when it is not
upgraded yet); such a claim is tracked like any other (`kind` `erc7710`, the redemption kept for
resends). A framework delegation is revoked with `disableDelegation`, which the delegator's account
calls under a one-use grant the relayer redeems for free; disabling an ERC-7710 claim disables its
fee's delegation too, in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import httpx
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from web3.exceptions import TransactionNotFound

from quotra.chain import delegation as dlg
from quotra.chain import eip712
from quotra.chain.client import ZERO_ADDRESS, DelegationArgs, EscrowClient
from quotra.chain.deployment import DelegationFramework, Deployment, DeploymentError
from quotra.chain.oneshot import OneShotRelayer, UnknownTask, new_task_id
from quotra.chain.relayer import ChainCall, DirectRelayer, Relayer, RelayerError, Submission, TxState
from quotra.config import Settings
from quotra.errors import BadRequest, Forbidden, NotFound, QuotraError, ServiceUnavailable
from quotra.store.claims_repo import (
    ClaimInFlight,
    ClaimsRepo,
    ClaimView,
    RevocationView,
    new_claim_id,
    new_revocation_id,
)
from quotra.store.models import utcnow
from quotra.store.repositories import Store
from quotra.webhooks import JwksCache, WebhookVerifier, parse_jwks

log = logging.getLogger("quotra.claims")

MAX_BACKOFF: Final = 300.0
# The claims poller: its pause after a failed round (at most), and between due rounds (at least).
FAILED_ROUND_PAUSE: Final = 5.0
MIN_PAUSE: Final = 0.05


class ClaimConflict(QuotraError):
    """The claim cannot go ahead in the escrow's current state (revoked, cap used, no earnings...)."""

    status_code = 409
    type = "invalid_request_error"
    code = "claim_conflict"


@dataclass(frozen=True)
class RelayerQuote:
    relayer: str
    delegate: str  # who submits (msg.sender): the address a delegation may name as `delegate`
    fee: int  # the smallest relayer_fee accepted, atomic USDC
    expires_at: int | None


def _hex(raw: bytes) -> str:
    return "0x" + bytes(raw).hex()


async def poll_forever(
    once: Callable[[], Awaitable[Any]], every: float, stop: asyncio.Event, failure: str
) -> None:
    """Run `once` every `every` seconds until `stop` is set; a failed round is logged as `failure`."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            await once()
        except Exception:
            log.exception(failure)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, every - (time.monotonic() - started)))


def check_signature(digest: bytes, signature: str, signer: str, has_code: bool) -> None:
    """`signer`'s ECDSA signature of `digest`; an account with code (a smart account, ERC-1271) is
    left to the contract, which checks it when the relayer simulates."""
    try:
        sig = eip712.Signature.from_bytes(signature)
        recovered = eip712.recover(digest, sig)
    except (eip712.InvalidSignature, ValueError) as exc:
        if has_code:
            return
        raise BadRequest(f"Invalid signature: {exc}", code="invalid_signature") from exc
    if recovered != signer and not has_code:
        raise BadRequest(f"The signature is not {signer}'s", code="invalid_signature")


async def delegation_disabled(escrow: EscrowClient, fw: DelegationFramework, delegation_hash: bytes) -> bool:
    """Whether the framework's DelegationManager has the delegation disabled."""
    data = dlg.DISABLED_DELEGATIONS + delegation_hash
    raw = await escrow.w3.eth.call({"to": fw.delegation_manager, "data": HexBytes(data)})
    return int.from_bytes(bytes(raw)[-32:] or b"\0", "big") != 0


def _check_offer(amount: int, quote: RelayerQuote, earnings: int) -> None:
    """A claim of `amount` the relay offers to sign for: above the relayer's fee, within earnings."""
    if amount <= quote.fee:
        raise BadRequest(
            f"amount must be above the relayer fee ({quote.fee} atomic USDC)", code="amount_not_above_fee"
        )
    if amount > earnings:
        raise ClaimConflict(
            f"amount exceeds the claimable earnings ({earnings} atomic USDC)", code="insufficient_earnings"
        )


class FrameworkUnavailable(NotFound):
    """No Delegation Framework is recorded for this relay's chain: ERC-7710 routes do not exist."""

    code = "erc7710_unavailable"


class ClaimService:
    def __init__(
        self,
        repo: ClaimsRepo,
        escrow: EscrowClient,
        relayer: Relayer,
        *,
        poll_seconds: float = 5.0,
        stale_seconds: float = 20.0,
        delegation_ttl: int = 3600,
        direct_fee: int = 0,
        from_block: int = 0,
        framework: DelegationFramework | None = None,
    ) -> None:
        self.repo = repo
        self.framework = framework
        self.escrow = escrow
        self.relayer = relayer
        self.poll_seconds = poll_seconds
        self.stale_seconds = stale_seconds
        self._opened = asyncio.Event()  # a claim or revocation opened here: the poller's next due
        self.delegation_ttl = delegation_ttl
        self.direct_fee = direct_fee
        self.from_block = from_block

    # ---- quotes and typed data -----------------------------------------------------------------

    async def quote(self) -> RelayerQuote:
        relayer = self.relayer
        try:
            if isinstance(relayer, OneShotRelayer):
                fee = await relayer.fee_data()
                delegate = fee.target_address or (await relayer.capabilities()).target_address
                return RelayerQuote("oneshot", delegate, fee.min_fee, fee.expiry)
        except RelayerError as exc:
            raise ServiceUnavailable(
                f"The relayer cannot be reached: {exc}", code="relayer_unavailable"
            ) from exc
        if isinstance(relayer, DirectRelayer):
            return RelayerQuote(relayer.name, relayer.address, self.direct_fee, None)
        address = getattr(relayer, "address", None)
        return RelayerQuote(
            relayer.name, to_checksum_address(address) if address else ZERO_ADDRESS, self.direct_fee, None
        )

    async def _quote_or_none(self) -> RelayerQuote | None:
        try:
            return await self.quote()
        except ServiceUnavailable:
            return None

    async def chain_time(self) -> int:
        block = await self.escrow.w3.eth.get_block("latest")
        return int(block["timestamp"])

    async def typed_data(self, provider: str, amount: int, payee: str | None = None) -> dict[str, Any]:
        """A Delegation for one claim of `amount` through the current relayer, ready to sign."""
        quote, now, earnings = await asyncio.gather(
            self.quote(), self.chain_time(), self.escrow.earnings_of(provider)
        )
        _check_offer(amount, quote, earnings)
        delegation = DelegationArgs(
            provider=provider,
            delegate=quote.delegate,
            payee=to_checksum_address(payee) if payee else provider,
            max_amount=amount,
            relayer_fee=quote.fee,
            valid_until=now + self.delegation_ttl,
            salt=secrets.randbits(64),
        )
        typed = eip712.typed_data(self.escrow.escrow_domain, "Delegation", delegation.as_message())
        return {
            "typed_data": typed,
            "digest": _hex(self.escrow.delegation_digest(delegation)),
            "delegation": delegation.as_message(),
            "quote": quote,
            "earnings": earnings,
        }

    # ---- claims --------------------------------------------------------------------------------

    async def submit(
        self, provider: str, delegation: DelegationArgs, signature: str, amount: int
    ) -> ClaimView:
        """Check a signed delegation against the escrow, then send one claim through the relayer."""
        provider = to_checksum_address(provider)
        if to_checksum_address(delegation.provider) != provider:
            raise Forbidden("The delegation is another provider's", code="not_your_delegation")
        if to_checksum_address(delegation.payee) == ZERO_ADDRESS:
            raise BadRequest("The delegation has no payee", code="zero_payee")
        if amount <= 0:
            raise BadRequest("amount must be positive", code="zero_amount")
        if delegation.relayer_fee >= delegation.max_amount:
            raise BadRequest(
                "relayer_fee must be below max_amount (it is the fee for claiming all of it)",
                code="relayer_fee_not_below_cap",
            )
        if amount > delegation.max_amount:
            raise BadRequest(
                f"amount {amount} is above the delegation's cap max_amount {delegation.max_amount}",
                code="delegation_cap_exceeded",
            )
        digest = self.escrow.delegation_digest(delegation)
        quote, now, code, revoked, claimed, earnings = await asyncio.gather(
            self._quote_or_none(),
            self.chain_time(),
            self.escrow.code_at(provider),
            self.escrow.is_revoked(provider, digest),
            self.escrow.delegation_claimed(digest),
            self.escrow.earnings_of(provider),
        )
        check_signature(digest, signature, provider, bool(code))
        delegate = to_checksum_address(delegation.delegate)
        # Without a quote (relayer unreachable) the claim is recorded and sent when the relayer is
        # back; the relayer then checks its delegate and fee itself.
        if quote is not None and delegate not in (ZERO_ADDRESS, quote.delegate):
            raise BadRequest(
                f"The delegation names delegate {delegate}, but the relayer submits from {quote.delegate}",
                code="wrong_delegate",
            )
        if quote is not None and delegation.relayer_fee_for(amount) < quote.fee:
            raise BadRequest(
                f"this claim would pay the relayer {delegation.relayer_fee_for(amount)} (the delegation's "
                f"relayer_fee, pro rata of max_amount), below its fee {quote.fee}: sign a new delegation "
                "(GET /v1/provider/claims/typed-data)",
                code="relayer_fee_too_low",
            )
        if now >= delegation.valid_until:
            raise BadRequest("The delegation has expired", code="delegation_expired")
        digest_hex = _hex(digest)
        tracked = await self.repo.get_delegation(digest_hex)
        if revoked or (tracked is not None and tracked.revoked_at is not None):
            raise ClaimConflict("The delegation has been revoked", code="delegation_revoked")
        if claimed + amount > delegation.max_amount:
            raise ClaimConflict(
                f"The delegation's cap would be exceeded: {delegation.max_amount - claimed} of "
                f"{delegation.max_amount} left",
                code="delegation_cap_exceeded",
            )
        if amount > earnings:
            raise ClaimConflict(
                f"amount exceeds the claimable earnings ({earnings})", code="insufficient_earnings"
            )
        sig_hex = "0x" + bytes.fromhex(signature.removeprefix("0x")).hex()
        await self.repo.save_delegation(
            digest=digest_hex,
            provider=provider,
            delegate=delegate,
            payee=to_checksum_address(delegation.payee),
            max_amount=delegation.max_amount,
            relayer_fee=delegation.relayer_fee,
            valid_until=delegation.valid_until,
            salt=delegation.salt,
            signature=sig_hex,
        )
        call = self.escrow.encode_claim_with_delegation(delegation, bytes.fromhex(sig_hex[2:]), amount)
        payee = to_checksum_address(delegation.payee)
        return await self._create_and_send(
            provider, payee, digest_hex, amount, delegation.relayer_fee_for(amount), call, kind="escrow"
        )

    async def _create_and_send(
        self, provider: str, payee: str, digest_hex: str, amount: int, fee: int, call: ChainCall, *, kind: str
    ) -> ClaimView:
        """Record a requested claim (one open per delegation), then hand it to the relayer."""
        claim_id = new_claim_id()
        try:
            await self.repo.create_claim(
                claim_id=claim_id,
                provider=provider,
                payee=payee,
                delegation_digest=digest_hex,
                amount=amount,
                relayer_fee=fee,
                relayer=self.relayer.name,
                task_id=new_task_id() if isinstance(self.relayer, OneShotRelayer) else None,
                next_check_at=utcnow() + timedelta(seconds=self.stale_seconds),
                kind=kind,
                redemption=call.redemption_json() if call.redemptions else None,
            )
        except ClaimInFlight:
            raise ClaimConflict(
                "Another claim under this delegation is still in flight", code="claim_in_flight"
            ) from None
        self._opened.set()
        await self._send(claim_id, call)
        claim = await self.repo.get_claim(claim_id)
        assert claim is not None
        return claim

    async def _send(self, row_id: str, call: ChainCall) -> Submission | None:
        """Hand a call to the relayer; on an outage the row stays requested for the poller."""
        row = await (
            self.repo.get_revocation(row_id) if row_id.startswith("rev_") else self.repo.get_claim(row_id)
        )
        task_id = row.task_id if row is not None else None
        try:
            if isinstance(self.relayer, OneShotRelayer):
                sub = await self.relayer.send(call, memo=row_id, task_id=task_id)
            else:
                sub = await self.relayer.send(call, memo=row_id)
        except RelayerError as exc:
            log.warning("claims.relayer_unavailable", extra={"row": row_id, "error": str(exc)[:200]})
            return None
        if sub.state is TxState.REJECTED:
            await self.repo.fail(row_id, sub.error or "rejected by the relayer")
        else:
            await self.repo.advance(row_id, sub)
        return sub

    def _claim_call(self, delegation: Any, amount: int) -> ChainCall:
        args = DelegationArgs(
            provider=delegation.provider,
            delegate=delegation.delegate,
            payee=delegation.payee,
            max_amount=delegation.max_amount,
            relayer_fee=delegation.relayer_fee,
            valid_until=delegation.valid_until,
            salt=delegation.salt,
        )
        return self.escrow.encode_claim_with_delegation(args, bytes.fromhex(delegation.signature[2:]), amount)

    # ---- revocations ---------------------------------------------------------------------------

    async def revoke(self, account: str, item: bytes, signature: str) -> RevocationView:
        """Stop using `item` at once, then revoke it on-chain through the relayer."""
        account = to_checksum_address(account)
        digest = self.escrow.revocation_digest(account, item)
        code, already = await asyncio.gather(
            self.escrow.code_at(account), self.escrow.is_revoked(account, item)
        )
        check_signature(digest, signature, account, bool(code))
        sig_hex = "0x" + bytes.fromhex(signature.removeprefix("0x")).hex()
        call = self.escrow.encode_revoke_with_signature(account, item, bytes.fromhex(sig_hex[2:]))
        return await self._record_revocation(account, item, sig_hex, already, call)

    async def _record_revocation(
        self,
        account: str,
        item: bytes,
        signature: str,
        already: bool,
        call: ChainCall,
        *,
        redemption: str | None = None,
    ) -> RevocationView:
        """Record a revocation (its item stops being used at once), then send it unless it is
        already in force on-chain."""
        revocation = await self.repo.create_revocation(
            revocation_id=new_revocation_id(),
            account=account,
            item=_hex(item),
            signature=signature,
            relayer=self.relayer.name,
            task_id=new_task_id() if isinstance(self.relayer, OneShotRelayer) else None,
            redemption=redemption,
        )
        if already:
            await self.repo.advance(revocation.id, Submission("", TxState.CONFIRMED))
        else:
            await self.repo.reschedule(
                revocation.id, attempts=0, next_check_at=utcnow() + timedelta(seconds=self.stale_seconds)
            )
            self._opened.set()
            await self._send(revocation.id, call)
        view = await self.repo.get_revocation(revocation.id)
        assert view is not None
        return view

    # ---- ERC-7710 claims and disableDelegation (MetaMask smart accounts) -----------------------

    def _fw(self) -> DelegationFramework:
        if self.framework is None:
            raise FrameworkUnavailable(
                "MetaMask's Delegation Framework is not recorded for this chain (the deployment "
                "file's delegation_framework): ERC-7710 claims are unavailable",
                code="erc7710_unavailable",
            )
        return self.framework

    def _dm_domain(self) -> eip712.Domain:
        return dlg.domain(self.escrow.chain_id, self._fw().delegation_manager)

    async def disabled(self, delegation_hash: bytes) -> bool:
        return await delegation_disabled(self.escrow, self._fw(), delegation_hash)

    async def _upgrade_needed(self, account: str) -> dict[str, Any] | None:
        """The EIP-7702 authorization `account` must sign to become MetaMask's stateless DeleGator
        (None if its code already delegates there)."""
        fw = self._fw()
        code = await self.escrow.code_at(account)
        if dlg.is_delegated_to(code, fw.stateless_delegator):
            return None
        nonce = await self.escrow.w3.eth.get_transaction_count(to_checksum_address(account))
        return {"chainId": self.escrow.chain_id, "address": fw.stateless_delegator, "nonce": nonce}

    async def redemption_typed_data(
        self, provider: str, amount: int, payee: str | None = None
    ) -> dict[str, Any]:
        """The framework Delegations for one claim of `amount` (and the relayer's fee), ready to
        sign, and the EIP-7702 authorization to sign if the account is not a smart account yet."""
        fw = self._fw()
        provider = to_checksum_address(provider)
        quote, now, earnings, upgrade = await asyncio.gather(
            self.quote(), self.chain_time(), self.escrow.earnings_of(provider), self._upgrade_needed(provider)
        )
        _check_offer(amount, quote, earnings)
        valid_until = now + self.delegation_ttl
        common = {"provider": provider, "delegate": quote.delegate, "usdc": self.escrow.usdc_address}
        claim = dlg.claim_delegation(
            fw,
            **common,
            escrow=self.escrow.escrow_address,
            payee=to_checksum_address(payee) if payee else provider,
            cap=amount,
            valid_until=valid_until,
            salt=secrets.randbits(64),
        )
        fee = dlg.fee_delegation(
            fw,
            **common,
            fee_collector=quote.delegate,
            fee=quote.fee,
            valid_until=valid_until,
            salt=secrets.randbits(64),
        )
        domain = self._dm_domain()
        return {
            "claim": claim.typed_data(domain),
            "fee": fee.typed_data(domain) if quote.fee else None,
            "authorization": upgrade,
            "quote": quote,
            "earnings": earnings,
        }

    async def submit_redemption(
        self,
        provider: str,
        claim: dlg.Delegation,
        fee: dlg.Delegation | None,
        amount: int | None,
        authorization: dlg.SetCodeAuthorization | None = None,
    ) -> ClaimView:
        """Check a provider's signed framework delegations, then send one `redeemDelegations`
        through the relayer: the provider's account claims, then pays the relayer's fee."""
        fw = self._fw()
        provider = to_checksum_address(provider)
        if claim.delegator != provider:
            raise Forbidden("The delegation is another provider's", code="not_your_delegation")
        try:
            grant = dlg.read_claim(
                fw, claim, escrow=self.escrow.escrow_address, usdc=self.escrow.usdc_address
            )
            quote = await self._quote_or_none()
            collector = quote.delegate if quote is not None else claim.delegate
            fee_amount = 0
            if fee is not None:
                if (fee.delegator, fee.delegate) != (provider, claim.delegate):
                    raise dlg.DelegationError(
                        "the fee delegation must come from the provider to the same delegate"
                    )
                fee_amount = dlg.read_fee(fw, fee, usdc=self.escrow.usdc_address, fee_collector=collector)
        except dlg.DelegationError as exc:
            raise BadRequest(str(exc), code="invalid_delegation") from None
        amount = grant.cap if amount is None else amount
        if not 0 < amount <= grant.cap:
            raise BadRequest(
                f"amount {amount} must be positive and at most the delegation's cap {grant.cap}",
                code="delegation_cap_exceeded",
            )
        if amount <= fee_amount:
            raise BadRequest(
                f"amount must be above the relayer fee ({fee_amount} atomic USDC)",
                code="amount_not_above_fee",
            )
        if quote is not None and claim.delegate != quote.delegate:
            raise BadRequest(
                f"The delegation names delegate {claim.delegate}, but the relayer submits from "
                f"{quote.delegate}",
                code="wrong_delegate",
            )
        if quote is not None and fee_amount < quote.fee:
            raise BadRequest(
                f"this claim would pay the relayer {fee_amount}, below its fee {quote.fee}: sign new "
                "delegations (GET /v1/provider/claims/erc7710/typed-data)",
                code="relayer_fee_too_low",
            )
        if authorization is not None:
            try:
                signer = authorization.authority
            except eip712.InvalidSignature as exc:
                raise BadRequest(f"Invalid authorization: {exc}", code="invalid_authorization") from None
            if (signer, authorization.address, authorization.chain_id) != (
                provider,
                fw.stateless_delegator,
                self.escrow.chain_id,
            ):
                raise BadRequest(
                    f"The authorization must be {provider}'s, on chain {self.escrow.chain_id}, to "
                    f"MetaMask's EIP7702StatelessDeleGator {fw.stateless_delegator}",
                    code="invalid_authorization",
                )
        digest = claim.digest(self._dm_domain())
        now, code, disabled, earnings = await asyncio.gather(
            self.chain_time(),
            self.escrow.code_at(provider),
            self.disabled(claim.hash),
            self.escrow.earnings_of(provider),
        )
        if authorization is None and not code:
            raise BadRequest(
                "The account is not a smart account: sign the EIP-7702 authorization the typed data "
                "endpoint returns (it makes the account MetaMask's stateless DeleGator)",
                code="not_a_smart_account",
            )
        # MetaMask's stateless DeleGator checks its EOA key's ECDSA signature: so does the relay.
        contract_wallet = bool(code) and not dlg.is_delegated_to(code, fw.stateless_delegator)
        check_signature(digest, _hex(claim.signature), provider, contract_wallet)
        if fee is not None:
            check_signature(fee.digest(self._dm_domain()), _hex(fee.signature), provider, contract_wallet)
        if now >= grant.valid_until:
            raise BadRequest("The delegation has expired", code="delegation_expired")
        digest_hex = _hex(claim.hash)
        tracked = await self.repo.get_delegation(digest_hex)
        if disabled or (tracked is not None and tracked.revoked_at is not None):
            raise ClaimConflict("The delegation has been disabled", code="delegation_revoked")
        if amount > earnings:
            raise ClaimConflict(
                f"amount exceeds the claimable earnings ({earnings})", code="insufficient_earnings"
            )
        entries = dlg.claim_redemptions(
            claim,
            fee,
            escrow=self.escrow.escrow_address,
            usdc=self.escrow.usdc_address,
            amount=amount,
            payee=grant.payee,
            fee_collector=collector,
            fee_amount=fee_amount,
        )
        call = ChainCall.redeem(
            fw.delegation_manager,
            entries,
            label="redeemDelegations",
            authorizations=[authorization] if authorization is not None else [],
        )
        await self.repo.save_delegation(
            digest=digest_hex,
            provider=provider,
            delegate=claim.delegate,
            payee=grant.payee,
            max_amount=grant.cap,
            relayer_fee=fee_amount,
            valid_until=grant.valid_until,
            salt=claim.salt,
            signature=_hex(claim.signature),
        )
        return await self._create_and_send(
            provider, grant.payee, digest_hex, amount, fee_amount, call, kind="erc7710"
        )

    async def account_kind(self, account: str) -> dict[str, Any]:
        """What `account` is to the Delegation Framework: MetaMask's stateless DeleGator by
        EIP-7702 (its framework delegations can be redeemed), a plain EOA, or another contract."""
        account = to_checksum_address(account)
        code = await self.escrow.code_at(account)
        fw = self.framework
        if fw is not None and dlg.is_delegated_to(code, fw.stateless_delegator):
            kind = "metamask_eip7702"
        else:
            kind = "contract" if code else "eoa"
        return {
            "address": account,
            "kind": kind,
            "erc7710": kind == "metamask_eip7702",
            "stateless_delegator": fw.stateless_delegator if fw is not None else None,
            "delegation_manager": fw.delegation_manager if fw is not None else None,
        }

    async def claim_delegations(self, provider: str, claim_id: str) -> list[dlg.Delegation]:
        """The framework delegations an ERC-7710 claim of `provider`'s was made under: the claim's,
        rebuilt from what the relay recorded, then the relayer's fee's (if it charged one), read
        from the redemption kept for resends (signatures aside: `disableDelegation` needs none)."""
        claim = await self.repo.get_claim(claim_id)
        if claim is None or claim.provider != to_checksum_address(provider):
            raise NotFound(f"No claim {claim_id}")
        row = await self.repo.get_delegation(claim.delegation_digest)
        if claim.kind != "erc7710" or row is None or claim.redemption is None:
            raise BadRequest(
                "This claim was made under the escrow's own Delegation: revoke that with a signed "
                "Revocation (POST /v1/revocations)",
                code="not_an_erc7710_claim",
            )
        fw = self._fw()
        target = dlg.claim_delegation(
            fw,
            provider=row.provider,
            delegate=row.delegate,
            escrow=self.escrow.escrow_address,
            usdc=self.escrow.usdc_address,
            payee=row.payee,
            cap=row.max_amount,
            valid_until=row.valid_until,
            salt=row.salt,
        )
        if _hex(target.hash) != claim.delegation_digest:
            raise ServiceUnavailable("The claim's delegation cannot be rebuilt", code="delegation_unknown")
        redemption = ChainCall.from_redemption_json(fw.delegation_manager, claim.redemption, label="claim")
        fees = [dlg.decode_context(entry.context)[0].signed(b"") for entry in redemption.redemptions[1:]]
        return [target, *fees]

    async def claim_disable_typed_data(self, provider: str, claim_id: str) -> list[dict[str, Any]]:
        """The grants to sign, one per delegation of the claim still enabled on-chain (its own,
        then its fee's), for `disable_claim`: redeemed by the relayer the claim was given to (no
        quote needed: it may be down)."""
        targets = await self.claim_delegations(provider, claim_id)
        disabled = await asyncio.gather(*(self.disabled(t.hash) for t in targets))
        live = [t for t, off in zip(targets, disabled, strict=True) if not off]
        if not live:
            raise ClaimConflict("The claim's delegations are already disabled", code="delegation_revoked")
        return [
            {
                **await self.disable_typed_data(t, targets[0].delegate),
                "delegation": t.message(),
                "role": "claim" if t == targets[0] else "fee",
            }
            for t in live
        ]

    async def disable_typed_data(self, target: dlg.Delegation, delegate: str | None = None) -> dict[str, Any]:
        """The one-use grant to sign so that the relayer makes the delegator's account call
        `DelegationManager.disableDelegation(target)` (free of charge): redeemed by `delegate`,
        by default the relayer's current submitter."""
        if delegate is None:
            delegate = (await self.quote()).delegate
        grant = dlg.disable_delegation(
            self._fw(),
            delegator=target.delegator,
            delegate=delegate,
            target=target,
            salt=secrets.randbits(64),
        )
        return {"typed_data": grant.typed_data(self._dm_domain()), "hash": _hex(target.hash)}

    async def disable(self, target: dlg.Delegation, grant: dlg.Delegation) -> RevocationView:
        """Stop using `target` at once, then disable it on-chain through the relayer."""
        try:
            dlg.check_disable(self._fw(), grant, target)
        except dlg.DelegationError as exc:
            raise BadRequest(str(exc), code="invalid_delegation") from None
        return await self._disable([(target, grant)])

    async def disable_claim(
        self, provider: str, claim_id: str, grants: list[dlg.Delegation]
    ) -> RevocationView:
        """Disable every delegation of an ERC-7710 claim still enabled (its own and its fee's: the
        relayer must not be able to take the fee without the claim), in one gasless transaction;
        `grants` must cover all of them."""
        targets = await self.claim_delegations(provider, claim_id)
        fw = self._fw()
        try:
            granted = {dlg.grant_target(fw, grant, targets).hash: grant for grant in grants}
        except dlg.DelegationError as exc:
            raise BadRequest(str(exc), code="invalid_delegation") from None
        disabled = await asyncio.gather(*(self.disabled(t.hash) for t in targets))
        missing = [t for t, off in zip(targets, disabled, strict=True) if not off and t.hash not in granted]
        if missing:
            raise BadRequest(
                f"Sign the grants of all the claim's enabled delegations: none for {_hex(missing[0].hash)} "
                f"(GET /v1/provider/claims/{claim_id}/disable/typed-data)",
                code="incomplete_disable",
            )
        return await self._disable([(t, granted[t.hash]) for t in targets if t.hash in granted])

    async def _disable(self, pairs: list[tuple[dlg.Delegation, dlg.Delegation]]) -> RevocationView:
        """Stop using the targets at once, then disable those still enabled on-chain in one
        `redeemDelegations` through the relayer; each (target, grant) already checked, all of one
        delegator. The revocation's item is the first target disabled by the call."""
        fw = self._fw()
        account = pairs[0][0].delegator
        code, disabled = await asyncio.gather(
            self.escrow.code_at(account), asyncio.gather(*(self.disabled(t.hash) for t, _ in pairs))
        )
        if not dlg.is_delegated_to(code, fw.stateless_delegator):
            raise BadRequest(
                f"{account} is not a MetaMask smart account: its delegations cannot be redeemed anyway",
                code="not_a_smart_account",
            )
        for _, grant in pairs:
            check_signature(grant.digest(self._dm_domain()), _hex(grant.signature), account, False)
        live = [pair for pair, off in zip(pairs, disabled, strict=True) if not off]
        target, grant = (live or pairs)[0]
        call = ChainCall.redeem(
            fw.delegation_manager,
            [dlg.disable_redemption(g, t, fw.delegation_manager) for t, g in live or pairs],
            label="disableDelegation",
        )
        return await self._record_revocation(
            account, target.hash, _hex(grant.signature), not live, call, redemption=call.redemption_json()
        )

    # ---- the poller ----------------------------------------------------------------------------

    async def _receipt(self, tx_hash: str | None) -> Submission | None:
        if not tx_hash:
            return None
        try:
            receipt = await self.escrow.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except (TransactionNotFound, ValueError):
            return None
        state = TxState.CONFIRMED if receipt["status"] == 1 else TxState.REVERTED
        return Submission(
            "",
            state,
            tx_hash=_hex(receipt["transactionHash"]),
            block_number=int(receipt["blockNumber"]),
            gas_used=int(receipt["gasUsed"]),
            error=None if state is TxState.CONFIRMED else "reverted",
        )

    async def _claimed_onchain(self, claim: ClaimView) -> Submission | None:
        """A `Claimed` event of this claim's delegation and amount (a relayer that lost its task);
        an ERC-7710 claim's event names no delegation: only its receipt tells."""
        if claim.kind == "erc7710":
            return None
        try:
            logs = await self.escrow.escrow.events.Claimed.get_logs(
                argument_filters={"delegation": HexBytes(claim.delegation_digest)}, from_block=self.from_block
            )
        except Exception as exc:  # a node without log filters: fall back on the relayer only
            log.info("claims.logs_unavailable", extra={"error": str(exc)[:200]})
            return None
        for entry in logs:
            if int(entry["args"]["amount"]) == claim.amount:
                return Submission(
                    "",
                    TxState.CONFIRMED,
                    tx_hash=_hex(entry["transactionHash"]),
                    block_number=int(entry["blockNumber"]),
                )
        return None

    async def _check_claim(self, claim: ClaimView) -> None:
        sub: Submission | None = None
        resend = claim.status == "requested" and claim.task_id is None
        if claim.task_id is not None:
            try:
                sub = await self.relayer.status(claim.task_id)
            except UnknownTask:
                sub = await self._receipt(claim.tx_hash) or await self._claimed_onchain(claim)
                resend = sub is None and claim.status == "requested"
            except RelayerError:
                sub = await self._receipt(claim.tx_hash)
        if sub is not None and sub.state is TxState.SUBMITTED and sub.tx_hash:
            sub = await self._receipt(sub.tx_hash) or sub
        if sub is not None:
            await self.repo.advance(claim.id, sub)
        elif resend:
            delegation = await self.repo.get_delegation(claim.delegation_digest)
            if delegation is None or delegation.revoked_at is not None:
                await self.repo.fail(claim.id, "delegation revoked")
                return
            if claim.redemption is not None:
                call = ChainCall.from_redemption_json(
                    self._fw().delegation_manager, claim.redemption, label="redeemDelegations"
                )
            else:
                call = self._claim_call(delegation, claim.amount)
            await self._send(claim.id, call)

    async def _check_revocation(self, revocation: RevocationView) -> None:
        sub: Submission | None = None
        resend = revocation.status == "requested" and revocation.task_id is None
        if revocation.task_id is not None:
            try:
                sub = await self.relayer.status(revocation.task_id)
            except UnknownTask:
                sub = await self._receipt(revocation.tx_hash)
                if sub is None and await self._revoked(revocation):
                    sub = Submission("", TxState.CONFIRMED)
                resend = sub is None and revocation.status == "requested"
            except RelayerError:
                sub = await self._receipt(revocation.tx_hash)
        if sub is not None:
            await self.repo.advance(revocation.id, sub)
        elif resend:
            await self._send(revocation.id, self._revocation_call(revocation))

    async def _revoked(self, revocation: RevocationView) -> bool:
        item = bytes.fromhex(revocation.item[2:])
        if revocation.redemption is not None:
            return await self.disabled(item)
        return await self.escrow.is_revoked(revocation.account, item)

    def _revocation_call(self, revocation: RevocationView) -> ChainCall:
        if revocation.redemption is not None:
            return ChainCall.from_redemption_json(
                self._fw().delegation_manager, revocation.redemption, label="disableDelegation"
            )
        return self.escrow.encode_revoke_with_signature(
            revocation.account, bytes.fromhex(revocation.item[2:]), bytes.fromhex(revocation.signature[2:])
        )

    async def poll_once(self) -> int:
        """Check every open claim and revocation that is due; returns how many were checked."""
        now = utcnow()
        rows: list[ClaimView | RevocationView] = [
            *await self.repo.due_claims(now),
            *await self.repo.due_revocations(now),
        ]
        for row in rows:
            try:
                if isinstance(row, ClaimView):
                    await self._check_claim(row)
                else:
                    await self._check_revocation(row)
            except Exception:
                log.exception("claims.check_failed", extra={"row": row.id})
            delay = min(self.stale_seconds * 2 ** min(row.attempts, 16), MAX_BACKOFF)
            await self.repo.reschedule(
                row.id, attempts=row.attempts + 1, next_check_at=utcnow() + timedelta(seconds=delay)
            )
        return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        """The poller, until `stop` is set: checks each open claim and revocation when it is due,
        sleeping until the next one is (or until this relay opens one). With none open it looks
        again after `poll_seconds`, for those another replica opened and left; an idle relay's
        poller costs one look a `poll_seconds`, not one every few seconds."""
        stopped = asyncio.ensure_future(stop.wait())
        opened: asyncio.Future[Any] | None = None
        try:
            while not stop.is_set():
                self._opened.clear()
                wait = min(self.poll_seconds, FAILED_ROUND_PAUSE)
                try:
                    await self.poll_once()
                    due = await self.repo.next_check()
                    wait = self.poll_seconds
                    if due is not None:
                        wait = min(wait, max(MIN_PAUSE, (due - utcnow()).total_seconds()))
                except Exception:
                    log.exception("claims.poll_failed")
                opened = asyncio.ensure_future(self._opened.wait())
                await asyncio.wait((stopped, opened), timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                opened.cancel()
        finally:
            stopped.cancel()
            if opened is not None:
                opened.cancel()

    # ---- earnings ------------------------------------------------------------------------------

    async def earnings(self, provider: str) -> dict[str, Any]:
        provider = to_checksum_address(provider)
        claimable, claimed_relay, per_listing, claims = await asyncio.gather(
            self.escrow.earnings_of(provider),
            self.repo.confirmed_total(provider),
            self.repo.listing_earnings(provider),
            self.repo.list_claims(provider, limit=1000),
        )
        claimed_chain: int | None
        try:
            logs = await self.escrow.escrow.events.Claimed.get_logs(
                argument_filters={"provider": provider}, from_block=self.from_block
            )
            claimed_chain = sum(int(entry["args"]["amount"]) for entry in logs)
        except Exception as exc:
            log.info("claims.logs_unavailable", extra={"error": str(exc)[:200]})
            claimed_chain = None
        pending = sum(c.amount for c in claims if c.status in ("requested", "submitted"))
        return {
            "claimable": claimable,
            "claimed": claimed_chain if claimed_chain is not None else claimed_relay,
            "claimed_via_relay": claimed_relay,
            "pending": pending,
            "per_listing": per_listing,
        }


# ---- wiring (called from the app's lifespan) ------------------------------------------------------


def configured_relayer(settings: Settings, http: httpx.AsyncClient) -> OneShotRelayer | None:
    """The 1Shot-style relayer when `QUOTRA_RELAYER=oneshot` (direct is built with the escrow client)."""
    if settings.relayer != "oneshot" or not settings.relayer_url:
        return None
    return OneShotRelayer(
        settings.relayer_url,
        chain_id=settings.chain_id,
        destination_url=settings.effective_webhook_url,
        http=http,
        timeout=settings.relayer_timeout_seconds,
    )


def webhook_verifier(settings: Settings, http: httpx.AsyncClient) -> WebhookVerifier | None:
    url = settings.effective_jwks_url
    pinned = parse_jwks(json.loads(settings.relayer_pinned_jwks)) if settings.relayer_pinned_jwks else []
    if url is None and not pinned:
        return None
    jwks = JwksCache(
        http,
        url,
        ttl=settings.jwks_cache_seconds,
        min_refetch=settings.jwks_min_refetch_seconds,
        pinned=pinned,
    )
    return WebhookVerifier(jwks, tolerance=settings.webhook_tolerance_seconds)


def build_claims(
    settings: Settings, store: Store, escrow: EscrowClient | None, relayer: Relayer | None
) -> tuple[ClaimsRepo, ClaimService | None]:
    repo = ClaimsRepo(store)
    if escrow is None or relayer is None:
        return repo, None
    from_block, framework = 0, None
    if settings.deployment_file is not None:
        with contextlib.suppress(DeploymentError):
            deployment = Deployment.load(settings.deployment_file)
            from_block, framework = deployment.block, deployment.delegation_framework
    service = ClaimService(
        repo,
        escrow,
        relayer,
        poll_seconds=settings.claims_poll_seconds,
        stale_seconds=settings.claims_stale_seconds,
        delegation_ttl=settings.claims_delegation_ttl_seconds,
        from_block=from_block,
        framework=framework,
    )
    return repo, service
