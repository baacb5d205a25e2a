"""The relay's async view of the chain: escrow and USDC reads, and escrow calls encoded for a relayer.

One `EscrowClient` per process, created in the app's lifespan (the ABIs are parsed once). Reads go
through web3's async HTTP provider; writes are never sent from here: `encode_*` returns a
`ChainCall` that a `Relayer` puts on-chain. The ABIs ship with the package (`quotra/chain/abi`):
the escrow's as compiled, USDC's as Circle's FiatToken v2.2 has it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Final

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_utils import function_abi_to_4byte_selector, get_abi_input_types, to_checksum_address
from hexbytes import HexBytes
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import MismatchedABI, TransactionNotFound

from quotra.chain import eip712
from quotra.chain.merkle import Credit
from quotra.chain.reads import ChainReads
from quotra.chain.relayer import ChainCall


@dataclass(frozen=True)
class PaymentArgs:
    """The escrow's `Payment` struct: an x402 authorization of `amount`, the provider that served
    the call, and what the call was charged (`charged` <= `amount`; the escrow credits the rest of
    the authorization to the payer's deposit)."""

    payer: str
    provider: str
    amount: int
    charged: int
    valid_after: int
    valid_before: int
    nonce: bytes
    signature: eip712.Signature

    def as_tuple(self) -> tuple[Any, ...]:
        sig = self.signature
        return (
            self.payer,
            self.provider,
            self.amount,
            self.charged,
            self.valid_after,
            self.valid_before,
            self.nonce,
            sig.v,
            sig.r,
            sig.s,
        )


@dataclass(frozen=True)
class PermissionArgs:
    """The escrow's `SpendPermission` struct (`developer` and `max_markup_bps`: the app developer
    the charges may pay a markup, and its most; the zero address and 0 for none)."""

    consumer: str
    spender: str
    allowance: int
    valid_after: int
    valid_until: int
    salt: int
    developer: str
    max_markup_bps: int

    def as_tuple(self) -> tuple[Any, ...]:
        return tuple(self.as_message().values())

    def as_message(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name, _ in eip712.TYPES["SpendPermission"]}


@dataclass(frozen=True)
class DelegationArgs:
    """The escrow's `Delegation` struct."""

    provider: str
    delegate: str
    payee: str
    max_amount: int
    relayer_fee: int
    valid_until: int
    salt: int

    def as_tuple(self) -> tuple[Any, ...]:
        return (
            self.provider,
            self.delegate,
            self.payee,
            self.max_amount,
            self.relayer_fee,
            self.valid_until,
            self.salt,
        )

    def relayer_fee_for(self, amount: int) -> int:
        """What the escrow pays the relayer for claiming `amount`: the signed fee, pro rata."""
        return self.relayer_fee * amount // self.max_amount

    def as_message(self) -> dict[str, Any]:
        return dict(
            zip(
                ("provider", "delegate", "payee", "max_amount", "relayer_fee", "valid_until", "salt"),
                self.as_tuple(),
                strict=True,
            )
        )


ZERO_ADDRESS: Final = "0x0000000000000000000000000000000000000000"


class Calldata:
    """One contract function's calldata, encoded and decoded by eth_abi from its ABI entry."""

    def __init__(self, contract_abi: list[dict[str, Any]], name: str) -> None:
        (entry,) = [e for e in contract_abi if e.get("type") == "function" and e.get("name") == name]
        self.types = get_abi_input_types(entry)  # type: ignore[arg-type]
        self.selector = function_abi_to_4byte_selector(entry)  # type: ignore[arg-type]

    def encode(self, *args: Any) -> bytes:
        return self.selector + abi_encode(self.types, args)

    def decode(self, data: bytes) -> tuple[Any, ...]:
        if bytes(data[:4]) != self.selector:
            raise ValueError("calldata of another function")
        return tuple(abi_decode(self.types, bytes(data[4:])))


@cache
def abi(name: str) -> list[dict[str, Any]]:
    """A contract ABI shipped with the package: `QuotraEscrow` or `FiatToken` (USDC)."""
    text = resources.files("quotra.chain").joinpath("abi", f"{name}.json").read_text(encoding="utf-8")
    entries: list[dict[str, Any]] = json.loads(text)
    return entries


class USDCDomainMismatch(Exception):
    """The token's name and version do not give the domain separator it reports."""


class EscrowClient:
    def __init__(
        self, w3: AsyncWeb3, *, escrow: str, usdc: str, chain_id: int, read_timeout: float = 10.0
    ) -> None:
        self.w3 = w3
        # The head and USDC balances, read on the paid call's path without web3 (see reads.py).
        self.reads = ChainReads(str(getattr(w3.provider, "endpoint_uri", "")), timeout=read_timeout)
        self.chain_id = chain_id
        self.escrow_address = to_checksum_address(escrow)
        self.usdc_address = to_checksum_address(usdc)
        escrow_abi = abi("QuotraEscrow")
        self.escrow = w3.eth.contract(address=self.escrow_address, abi=escrow_abi)
        self._settle = Calldata(escrow_abi, "settle_authorizations")
        # The views read bare (`ChainReads.view`), by their selectors in the escrow's ABI.
        self._views = {
            item["name"]: "0x" + function_abi_to_4byte_selector(item).hex()  # type: ignore[arg-type]
            for item in escrow_abi
            if item.get("type") == "function" and item.get("stateMutability") == "view"
        }
        self.usdc = w3.eth.contract(address=self.usdc_address, abi=abi("FiatToken"))
        self.escrow_domain = eip712.escrow_domain(chain_id, self.escrow_address)

    @classmethod
    def connect(
        cls, rpc_url: str, *, escrow: str, usdc: str, chain_id: int, timeout: float = 10.0
    ) -> EscrowClient:
        # One attempt per read, `timeout` long: the callers retry on their own schedule (web3's
        # default five retries with backoff turned a hung node into a ~55 s stall).
        provider = AsyncHTTPProvider(
            rpc_url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None
        )
        return cls(AsyncWeb3(provider), escrow=escrow, usdc=usdc, chain_id=chain_id, read_timeout=timeout)

    async def close(self) -> None:
        await self.reads.close()
        await self.w3.provider.disconnect()

    # ---- reads ---------------------------------------------------------------------------------

    async def _escrow_view(self, name: str, *args: str | bytes | int) -> int:
        """One of the escrow's one-word views, read bare (`ChainReads.view`)."""
        return (await self.reads.view(self.escrow_address, self._views[name], args, 1))[0]

    async def chain_id_onchain(self) -> int:
        return int(await self.w3.eth.chain_id)

    async def block_number(self) -> int:
        return await self.reads.block_number()

    async def usdc_domain(self) -> eip712.Domain:
        """USDC's EIP-712 domain as the token reports it (its name differs per network: "USDC" on
        Base Sepolia, "USD Coin" on Base): `name()` and `version()`, checked against its
        `DOMAIN_SEPARATOR()` (FiatToken has no EIP-5267 `eip712Domain()`)."""
        name, version, separator = (
            await self.usdc.functions.name().call(),
            await self.usdc.functions.version().call(),
            bytes(await self.usdc.functions.DOMAIN_SEPARATOR().call()),
        )
        domain = eip712.Domain(name, version, self.chain_id, self.usdc_address)
        if separator != domain.separator:
            raise USDCDomainMismatch(
                f"USDC at {self.usdc_address} reports a domain that does not match its separator"
            )
        return domain

    async def usdc_balance(self, account: str, block: int | None = None) -> int:
        """`account`'s USDC balance, at `block` (the latest if None)."""
        return await self.reads.balance_of(self.usdc_address, account, block)

    async def authorization_used(self, payer: str, nonce: bytes, block: int | None = None) -> bool:
        """Whether USDC marks (payer, nonce) used or cancelled, at `block` (the latest if None)."""
        fn = self.usdc.functions.authorizationState(to_checksum_address(payer), nonce)
        return bool(await fn.call(block_identifier="latest" if block is None else block))

    async def deposit_of(self, consumer: str) -> int:
        return await self._escrow_view("deposits", consumer)

    async def withdrawal_of(self, consumer: str) -> tuple[int, int]:
        amount, unlock_at = await self.reads.view(
            self.escrow_address, self._views["withdrawals"], (consumer,), 2
        )
        return amount, unlock_at

    async def withdrawal_nonce(self, consumer: str) -> int:
        """The nonce the consumer's next signed withdrawal step must carry."""
        return await self._escrow_view("withdrawal_nonces", consumer)

    async def earnings_of(self, provider: str) -> int:
        return await self._escrow_view("earnings", provider)

    async def permission_spent(self, digest: bytes) -> int:
        return await self._escrow_view("permission_spent", digest)

    async def reference_settled(self, reference: bytes) -> bool:
        """Whether a charge batch reference has settled (each settles once)."""
        return bool(await self._escrow_view("settled_references", reference))

    async def usdc_allowance(self, owner: str, spender: str) -> int:
        return int(
            await self.usdc.functions.allowance(
                to_checksum_address(owner), to_checksum_address(spender)
            ).call()
        )

    async def delegation_claimed(self, digest: bytes) -> int:
        return await self._escrow_view("delegation_claimed", digest)

    async def is_revoked(self, account: str, digest: bytes) -> bool:
        return bool(await self._escrow_view("revoked", account, digest))

    async def fee_bps(self) -> int:
        return await self._escrow_view("fee_bps")

    async def liabilities(self) -> int:
        return await self._escrow_view("liabilities")

    async def is_operator(self, account: str) -> bool:
        return bool(await self._escrow_view("is_operator", account))

    async def paused(self) -> bool:
        return bool(await self._escrow_view("paused"))

    async def code_at(self, address: str) -> bytes:
        return bytes(await self.w3.eth.get_code(to_checksum_address(address)))

    async def deposits_in(self, tx_hash: str) -> list[tuple[str, str, int]]:
        """(sender, beneficiary, amount) of each deposit a mined transaction made into the escrow
        (none for an unknown, pending or failed one)."""
        try:
            receipt = await self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return []
        if receipt["status"] != 1:
            return []
        found = []
        for entry in receipt["logs"]:
            if to_checksum_address(entry["address"]) != self.escrow_address:
                continue
            try:
                event = self.escrow.events.Deposited().process_log(entry)
            except MismatchedABI:
                continue
            args = event["args"]
            found.append((args["sender"], args["beneficiary"], int(args["amount"])))
        return found

    # ---- escrow calls, encoded for a relayer ---------------------------------------------------

    def _call(self, fn: Any, label: str) -> ChainCall:
        return ChainCall(to=self.escrow_address, data=HexBytes(fn._encode_transaction_data()), label=label)

    def encode_settle_authorizations(self, payments: list[PaymentArgs]) -> ChainCall:
        # A batch is encoded (and read back by the indexer) by eth_abi straight from the ABI's
        # types: web3's argument normalisation cost ~100 ms of CPU per batch of 64.
        data = self._settle.encode([p.as_tuple() for p in payments])
        return ChainCall(
            to=self.escrow_address, data=HexBytes(data), label=f"settle_authorizations[{len(payments)}]"
        )

    def decode_settle_authorizations(self, data: bytes) -> list[tuple[Any, ...]]:
        """The `Payment` tuples of a `settle_authorizations` transaction's input."""
        (payments,) = self._settle.decode(data)
        return list(payments)

    def encode_reconcile_authorization(self, payment: PaymentArgs) -> ChainCall:
        fn = self.escrow.functions.reconcile_authorization(payment.as_tuple())
        return self._call(fn, "reconcile_authorization")

    def encode_refund_payment(self, credit: Credit, root: bytes, proof: list[bytes]) -> ChainCall:
        """A refund of `credit`, proven by its leaf's path to the settlement's `root`."""
        fn = self.escrow.functions.refund_payment(credit.as_tuple(), root, proof)
        return self._call(fn, "refund_payment")

    def encode_settle_charges(
        self,
        permission: PermissionArgs,
        signature: bytes,
        reference: bytes,
        charges: list[int],
        markup: int = 0,
    ) -> ChainCall:
        """`charges` are the calls' base cost, packed with `quotra.chain.charges.pack_charge` (one
        per provider); `markup` the app developer's on top. The escrow settles each `reference`
        once."""
        fn = self.escrow.functions.settle_charges(
            permission.as_tuple(), signature, reference, charges, markup
        )
        return self._call(fn, f"settle_charges[{len(charges)}]")

    def encode_usdc_approve(self, spender: str, amount: int) -> ChainCall:
        fn = self.usdc.functions.approve(to_checksum_address(spender), amount)
        return ChainCall(to=self.usdc_address, data=HexBytes(fn._encode_transaction_data()), label="approve")

    def encode_deposit_with_authorization(
        self,
        consumer: str,
        amount: int,
        valid_after: int,
        valid_before: int,
        nonce: bytes,
        signature: eip712.Signature,
    ) -> ChainCall:
        fn = self.escrow.functions.deposit_with_authorization(
            to_checksum_address(consumer),
            amount,
            valid_after,
            valid_before,
            nonce,
            signature.v,
            signature.r,
            signature.s,
        )
        return self._call(fn, "deposit_with_authorization")

    def encode_claim_with_delegation(
        self, delegation: DelegationArgs, signature: bytes, amount: int
    ) -> ChainCall:
        fn = self.escrow.functions.claim_with_delegation(delegation.as_tuple(), signature, amount)
        return self._call(fn, "claim_with_delegation")

    def encode_revoke_with_signature(self, account: str, item: bytes, signature: bytes) -> ChainCall:
        fn = self.escrow.functions.revoke_with_signature(to_checksum_address(account), item, signature)
        return self._call(fn, "revoke_with_signature")

    def encode_withdrawal_step(
        self, primary: str, consumer: str, value: int, deadline: int, signature: bytes
    ) -> ChainCall:
        """A consumer's signed `RequestWithdrawal` (value: the amount), `CancelWithdrawal` (the
        pending amount, not an argument) or `Withdraw` (value: the relayer's fee)."""
        f, consumer = self.escrow.functions, to_checksum_address(consumer)
        if primary == "RequestWithdrawal":
            return self._call(
                f.request_withdrawal_with_signature(consumer, value, deadline, signature), primary
            )
        if primary == "CancelWithdrawal":
            return self._call(f.cancel_withdrawal_with_signature(consumer, deadline, signature), primary)
        return self._call(f.withdraw_with_signature(consumer, value, deadline, signature), primary)

    # ---- digests (local, no I/O) ----------------------------------------------------------------

    def permission_digest(self, permission: PermissionArgs) -> bytes:
        return eip712.digest(self.escrow_domain, "SpendPermission", permission.as_message())

    def delegation_digest(self, delegation: DelegationArgs) -> bytes:
        return eip712.digest(self.escrow_domain, "Delegation", delegation.as_message())

    def revocation_digest(self, account: str, item: bytes) -> bytes:
        return eip712.digest(self.escrow_domain, "Revocation", {"account": account, "item": item})
