"""MetaMask's Delegation Framework (ERC-7710) as Quotra speaks it: delegations and their caveats,
EIP-712 hashing, permission contexts, executions, `redeemDelegations` calldata, and the caveat
sets of a provider's claim, a relayer's fee and a consumer's periodic allowance.

The framework's contracts (DelegationManager, EIP7702StatelessDeleGator, the caveat enforcers,
v1.3.0) are MetaMask's audited bytecode; this module only encodes what they read. Terms are the
enforcers' packed layouts. A delegation is signed under the DelegationManager's EIP-712 domain
("DelegationManager", "1", chain id, its address) by the delegator's key: for an EIP-7702
upgraded EOA the stateless DeleGator checks that same ECDSA signature (ERC-1271).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, TypeVar

import rlp
from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_utils import function_signature_to_4byte_selector, keccak, to_checksum_address

from quotra.chain import eip712

if TYPE_CHECKING:
    from quotra.chain.deployment import DelegationFramework

T = TypeVar("T")

DOMAIN_NAME: Final = "DelegationManager"
DOMAIN_VERSION: Final = "1"
FRAMEWORK_VERSION: Final = "1.3.0"
# A root delegation's authority, and the delegate that lets anyone redeem (framework constants).
ROOT_AUTHORITY: Final = b"\xff" * 32
ANY_DELEGATE: Final = "0x0000000000000000000000000000000000000a11"
# ERC-7579 execution modes: single call and batch, default exec type (revert on failure).
MODE_SINGLE: Final = bytes(32)
MODE_BATCH: Final = b"\x01" + bytes(31)
# An EIP-7702 delegated account's code: this prefix, then the implementation's address.
EIP7702_PREFIX: Final = b"\xef\x01\x00"

DELEGATION_TUPLE: Final = "(address,address,bytes32,(address,bytes,bytes)[],uint256,bytes)"
CAVEAT_TYPEHASH: Final = keccak(text="Caveat(address enforcer,bytes terms)")
DELEGATION_TYPEHASH: Final = keccak(
    text="Delegation(address delegate,address delegator,bytes32 authority,Caveat[] caveats,uint256 salt)"
    "Caveat(address enforcer,bytes terms)"
)
EIP712_TYPES: Final[dict[str, list[dict[str, str]]]] = {
    "EIP712Domain": [{"name": n, "type": t} for n, t in eip712.EIP712_DOMAIN_FIELDS],
    "Delegation": [
        {"name": "delegate", "type": "address"},
        {"name": "delegator", "type": "address"},
        {"name": "authority", "type": "bytes32"},
        {"name": "caveats", "type": "Caveat[]"},
        {"name": "salt", "type": "uint256"},
    ],
    "Caveat": [{"name": "enforcer", "type": "address"}, {"name": "terms", "type": "bytes"}],
}


def selector(signature: str) -> bytes:
    return function_signature_to_4byte_selector(signature)


REDEEM_DELEGATIONS: Final = selector("redeemDelegations(bytes[],bytes32[],bytes[])")
DISABLE_DELEGATION: Final = selector(f"disableDelegation({DELEGATION_TUPLE})")
DISABLED_DELEGATIONS: Final = selector("disabledDelegations(bytes32)")
ERC20_TRANSFER: Final = selector("transfer(address,uint256)")
ERC20_APPROVE: Final = selector("approve(address,uint256)")
ESCROW_CLAIM: Final = selector("claim(uint256,address)")
ESCROW_DEPOSIT: Final = selector("deposit(uint256,address)")
PERIOD_AVAILABLE: Final = selector("getAvailableAmount(bytes32,address,bytes)")
LIMITED_CALLS_COUNT: Final = selector("callCounts(address,bytes32)")

# Custom errors of the DelegationManager and the DeleGator, by selector (enforcers revert with
# strings such as "AllowedTargetsEnforcer:target-address-not-allowed").
ERRORS: Final[dict[bytes, str]] = {
    selector(name): name.split("(")[0]
    for name in (
        "CannotUseADisabledDelegation()",
        "InvalidDelegate()",
        "InvalidDelegator()",
        "InvalidAuthority()",
        "InvalidEOASignature()",
        "InvalidERC1271Signature()",
        "BatchDataLengthMismatch()",
        "AlreadyDisabled()",
        "AlreadyEnabled()",
        "EmptySignature()",
        "EnforcedPause()",
        "ECDSAInvalidSignature()",
        "ECDSAInvalidSignatureLength(uint256)",
        "ECDSAInvalidSignatureS(bytes32)",
        "NotEntryPointOrSelf()",
        "NotDelegationManager()",
        "UnauthorizedCallContext()",
        "UnsupportedCallType(bytes1)",
        "UnsupportedExecType(bytes1)",
    )
}


class DelegationError(ValueError):
    """A delegation, context or terms that cannot be read or are not what they must be."""


def describe_revert(data: bytes | str | None) -> str:
    """A framework revert as text: the custom error's name, or the revert string."""
    if isinstance(data, str):
        try:
            data = bytes.fromhex(data.removeprefix("0x"))
        except ValueError:
            return str(data)
    if not data:
        return "reverted without a reason"
    if name := ERRORS.get(bytes(data[:4])):
        return name
    if data[:4] == selector("Error(string)"):
        with contextlib.suppress(Exception):  # malformed: the hex below
            (reason,) = abi_decode(["string"], bytes(data[4:]))
            return str(reason)
    return "0x" + bytes(data).hex()


def domain(chain_id: int, delegation_manager: str) -> eip712.Domain:
    """The DelegationManager's EIP-712 domain on a chain."""
    return eip712.Domain(DOMAIN_NAME, DOMAIN_VERSION, chain_id, to_checksum_address(delegation_manager))


def _address_bytes(address: str) -> bytes:
    return bytes.fromhex(to_checksum_address(address)[2:])


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


@dataclass(frozen=True)
class Caveat:
    """One caveat: the enforcer, its packed terms (signed) and the redeemer's args (not signed)."""

    enforcer: str
    terms: bytes
    args: bytes = b""

    def as_tuple(self) -> tuple[str, bytes, bytes]:
        return (to_checksum_address(self.enforcer), self.terms, self.args)

    @property
    def hash(self) -> bytes:
        values = [CAVEAT_TYPEHASH, self.enforcer, keccak(self.terms)]
        return keccak(abi_encode(["bytes32", "address", "bytes32"], values))


@dataclass(frozen=True)
class Delegation:
    """A framework `Delegation`: `delegator` grants `delegate` what the caveats allow."""

    delegate: str
    delegator: str
    caveats: tuple[Caveat, ...]
    salt: int
    authority: bytes = ROOT_AUTHORITY
    signature: bytes = field(default=b"", repr=False)

    @property
    def hash(self) -> bytes:
        """The EIP-712 struct hash (`DelegationManager.getDelegationHash`): the delegation's id."""
        caveats = keccak(b"".join(c.hash for c in self.caveats))
        return keccak(
            abi_encode(
                ["bytes32", "address", "address", "bytes32", "bytes32", "uint256"],
                [DELEGATION_TYPEHASH, self.delegate, self.delegator, self.authority, caveats, self.salt],
            )
        )

    def digest(self, dm_domain: eip712.Domain) -> bytes:
        """What the delegator signs: `keccak(0x1901 ‖ domainSeparator ‖ hash)`."""
        return keccak(b"\x19\x01" + dm_domain.separator + self.hash)

    def signed(self, signature: bytes) -> Delegation:
        return replace(self, signature=signature)

    def as_tuple(self) -> tuple[Any, ...]:
        return (
            to_checksum_address(self.delegate),
            to_checksum_address(self.delegator),
            self.authority,
            [c.as_tuple() for c in self.caveats],
            self.salt,
            self.signature,
        )

    def message(self) -> dict[str, Any]:
        """The EIP-712 message as JSON (bytes as 0x-hex, the salt as a decimal string)."""
        return {
            "delegate": to_checksum_address(self.delegate),
            "delegator": to_checksum_address(self.delegator),
            "authority": "0x" + self.authority.hex(),
            "caveats": [
                {"enforcer": to_checksum_address(c.enforcer), "terms": "0x" + c.terms.hex()}
                for c in self.caveats
            ],
            "salt": str(self.salt),
        }

    def typed_data(self, dm_domain: eip712.Domain) -> dict[str, Any]:
        """The full EIP-712 JSON a wallet (`eth_signTypedData_v4`) is asked to sign."""
        return {
            "types": EIP712_TYPES,
            "primaryType": "Delegation",
            "domain": dm_domain.as_dict(),
            "message": self.message(),
        }

    @classmethod
    def from_message(cls, message: dict[str, Any], signature: bytes = b"") -> Delegation:
        """A delegation from its EIP-712 message JSON (as `message()` writes it); `DelegationError`
        if a field is missing or malformed."""
        try:
            authority = bytes.fromhex(str(message.get("authority", "0x" + ROOT_AUTHORITY.hex()))[2:])
            caveats = tuple(
                Caveat(to_checksum_address(c["enforcer"]), bytes.fromhex(str(c["terms"]).removeprefix("0x")))
                for c in message["caveats"]
            )
            salt = message["salt"]
            delegation = cls(
                delegate=to_checksum_address(message["delegate"]),
                delegator=to_checksum_address(message["delegator"]),
                caveats=caveats,
                salt=int(salt, 0) if isinstance(salt, str) else int(salt),
                authority=authority,
                signature=signature,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DelegationError(f"not a Delegation message: {exc}") from None
        if len(authority) != 32 or not 0 <= delegation.salt < 2**256:
            raise DelegationError("not a Delegation message: authority must be 32 bytes, salt a uint256")
        return delegation


def encode_context(chain: Sequence[Delegation]) -> bytes:
    """A permission context: `abi.encode(Delegation[])`, leaf first, root last."""
    return abi_encode([DELEGATION_TUPLE + "[]"], [[d.as_tuple() for d in chain]])


def decode_context(context: bytes) -> tuple[Delegation, ...]:
    """The delegations of a permission context (leaf first); `DelegationError` if malformed."""
    try:
        (raw,) = abi_decode([DELEGATION_TUPLE + "[]"], context)
    except Exception as exc:  # eth_abi raises several decoding errors
        raise DelegationError(f"not a permission context (abi.encode(Delegation[])): {exc}") from None
    return tuple(
        Delegation(
            delegate=to_checksum_address(delegate),
            delegator=to_checksum_address(delegator),
            caveats=tuple(Caveat(to_checksum_address(e), bytes(t), bytes(a)) for e, t, a in caveats),
            salt=int(salt),
            authority=bytes(authority),
            signature=bytes(signature),
        )
        for delegate, delegator, authority, caveats, salt, signature in raw
    )


# ---- executions and calls ------------------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """One call an account makes: `target.call{value}(data)`."""

    target: str
    data: bytes
    value: int = 0

    def single(self) -> bytes:
        """ERC-7579 single-mode calldata: `target ‖ value ‖ data`, packed."""
        return _address_bytes(self.target) + _word(self.value) + self.data

    def as_json(self) -> dict[str, str]:
        target = to_checksum_address(self.target)
        return {"target": target, "value": str(self.value), "data": "0x" + self.data.hex()}


def batch(executions: Iterable[Execution]) -> bytes:
    """ERC-7579 batch-mode calldata: `abi.encode((address,uint256,bytes)[])`."""
    calls = [(to_checksum_address(e.target), e.value, e.data) for e in executions]
    return abi_encode(["(address,uint256,bytes)[]"], [calls])


@dataclass(frozen=True)
class Redemption:
    """One entry of `redeemDelegations`: a permission context (`encode_context([])`: the caller's
    own account runs it) and what the account runs, one execution (single mode) or several
    (batch mode)."""

    context: bytes
    executions: tuple[Execution, ...]

    @property
    def mode(self) -> bytes:
        return MODE_SINGLE if len(self.executions) == 1 else MODE_BATCH

    @property
    def execution(self) -> bytes:
        """The execution calldata for `mode`."""
        return self.executions[0].single() if len(self.executions) == 1 else batch(self.executions)


def encode_redeem(entries: Sequence[Redemption]) -> bytes:
    """`DelegationManager.redeemDelegations(contexts, modes, executions)` calldata."""
    return REDEEM_DELEGATIONS + abi_encode(
        ["bytes[]", "bytes32[]", "bytes[]"],
        [[e.context for e in entries], [e.mode for e in entries], [e.execution for e in entries]],
    )


def encode_disable(delegation: Delegation) -> bytes:
    """`DelegationManager.disableDelegation(delegation)` calldata (the delegator must send it).
    The signature is left out (the manager only hashes the rest), so the calldata is the same
    whoever holds the signed copy: what a disable grant's `ExactCalldataEnforcer` pins."""
    return DISABLE_DELEGATION + abi_encode([DELEGATION_TUPLE], [delegation.signed(b"").as_tuple()])


def erc20_transfer(to: str, amount: int) -> bytes:
    return ERC20_TRANSFER + abi_encode(["address", "uint256"], [to, amount])


def erc20_approve(spender: str, amount: int) -> bytes:
    return ERC20_APPROVE + abi_encode(["address", "uint256"], [spender, amount])


def escrow_claim(amount: int, payee: str) -> bytes:
    return ESCROW_CLAIM + abi_encode(["uint256", "address"], [amount, payee])


def escrow_deposit(amount: int, beneficiary: str) -> bytes:
    return ESCROW_DEPOSIT + abi_encode(["uint256", "address"], [amount, beneficiary])


def is_delegated_to(code: bytes, implementation: str) -> bool:
    """Whether an account's code is an EIP-7702 delegation to `implementation`."""
    return bytes(code) == EIP7702_PREFIX + _address_bytes(implementation)


@dataclass(frozen=True)
class SetCodeAuthorization:
    """A signed EIP-7702 authorization: once a type-4 transaction carries it (whoever sends and
    pays for it), the signer's account code delegates to `address`, e.g. MetaMask's stateless
    DeleGator, and the EOA is a smart account."""

    chain_id: int
    address: str
    nonce: int
    y_parity: int
    r: int
    s: int

    @property
    def digest(self) -> bytes:
        """What the account signs: `keccak(0x05 ‖ rlp([chain_id, address, nonce]))`."""
        return keccak(b"\x05" + rlp.encode([self.chain_id, _address_bytes(self.address), self.nonce]))

    @property
    def authority(self) -> str:
        """The account that signed (its code is what changes); `eip712.InvalidSignature` if none."""
        raw = self.r.to_bytes(32, "big") + self.s.to_bytes(32, "big") + bytes([27 + self.y_parity])
        return eip712.recover(self.digest, eip712.Signature.from_bytes(raw))

    def as_tx(self) -> dict[str, Any]:
        """The entry of a type-4 transaction's `authorizationList` (eth-account's shape)."""
        return {
            "chainId": self.chain_id,
            "address": to_checksum_address(self.address),
            "nonce": self.nonce,
            "yParity": self.y_parity,
            "r": self.r,
            "s": self.s,
        }

    def as_json(self) -> dict[str, Any]:
        """As JSON-RPC writes it (quantities as 0x-hex)."""
        return {k: hex(v) if isinstance(v, int) else v for k, v in self.as_tx().items()}

    @classmethod
    def from_json(cls, value: Any) -> SetCodeAuthorization:
        """From `as_json` / `as_tx` output (quantities as ints, decimal or 0x-hex strings)."""

        def number(key: str) -> int:
            raw = value[key]
            if isinstance(raw, bool):
                raise TypeError(f"{key} must be a number")
            return int(raw, 0) if isinstance(raw, str) else int(raw)

        try:
            auth = cls(
                number("chainId"),
                to_checksum_address(value["address"]),
                number("nonce"),
                number("yParity"),
                number("r"),
                number("s"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DelegationError(f"not an EIP-7702 authorization: {exc}") from None
        if auth.y_parity not in (0, 1) or not (0 < auth.r < 2**256 and 0 < auth.s < 2**256):
            raise DelegationError("not an EIP-7702 authorization: bad signature values")
        return auth


# ---- caveat terms (each enforcer's packed layout) ------------------------------------------------


def allowed_targets(*targets: str) -> bytes:
    return b"".join(_address_bytes(t) for t in targets)


def allowed_methods(*selectors: bytes) -> bytes:
    return b"".join(selectors)


def allowed_calldata(start: int, value: bytes) -> bytes:
    """`callData[start : start + len(value)] == value` (the selector counts: the 1st argument is at 4)."""
    return _word(start) + value


def address_word(address: str) -> bytes:
    """An address as a 32-byte ABI word (for `allowed_calldata` on an address argument)."""
    return bytes(12) + _address_bytes(address)


def erc20_balance_change(decrease: bool, token: str, recipient: str, amount: int) -> bytes:
    return bytes([int(decrease)]) + _address_bytes(token) + _address_bytes(recipient) + _word(amount)


def erc20_transfer_amount(token: str, max_amount: int) -> bytes:
    return _address_bytes(token) + _word(max_amount)


def erc20_period_transfer(token: str, period_amount: int, period_duration: int, start_date: int) -> bytes:
    return _address_bytes(token) + _word(period_amount) + _word(period_duration) + _word(start_date)


def timestamp(after: int, before: int) -> bytes:
    """Valid strictly after `after` (0: no bound) and strictly before `before` (0: no bound)."""
    return after.to_bytes(16, "big") + before.to_bytes(16, "big")


def limited_calls(limit: int) -> bytes:
    return _word(limit)


def redeemer(*redeemers: str) -> bytes:
    return b"".join(_address_bytes(r) for r in redeemers)


def value_lte(max_value: int) -> bytes:
    return _word(max_value)


@dataclass(frozen=True)
class PeriodTerms:
    """`ERC20PeriodTransferEnforcer` terms: at most `amount` of `token` per `duration` seconds,
    periods counted from `start`."""

    token: str
    amount: int
    duration: int
    start: int

    @classmethod
    def parse(cls, terms: bytes) -> PeriodTerms:
        if len(terms) != 116:
            raise DelegationError("ERC20PeriodTransferEnforcer terms are 116 bytes")
        return cls(
            to_checksum_address(terms[:20]),
            int.from_bytes(terms[20:52], "big"),
            int.from_bytes(terms[52:84], "big"),
            int.from_bytes(terms[84:116], "big"),
        )


def timestamp_bounds(terms: bytes) -> tuple[int, int]:
    """(after, before) of `TimestampEnforcer` terms."""
    if len(terms) != 32:
        raise DelegationError("TimestampEnforcer terms are 32 bytes")
    return int.from_bytes(terms[:16], "big"), int.from_bytes(terms[16:], "big")


# ---- Quotra's grants -----------------------------------------------------------------------------


def claim_delegation(
    fw: DelegationFramework,
    *,
    provider: str,
    delegate: str,
    escrow: str,
    usdc: str,
    payee: str,
    cap: int,
    valid_until: int,
    salt: int,
) -> Delegation:
    """A provider's smart account lets `delegate` (the relayer) run exactly one
    `escrow.claim(amount <= cap, payee)` before `valid_until`: the target, the method and the payee
    are fixed, the escrow's USDC may fall by at most `cap` around the call, and it redeems once."""
    return Delegation(
        delegate=delegate,
        delegator=provider,
        caveats=(
            Caveat(fw.address("AllowedTargetsEnforcer"), allowed_targets(escrow)),
            Caveat(fw.address("AllowedMethodsEnforcer"), allowed_methods(ESCROW_CLAIM)),
            Caveat(fw.address("AllowedCalldataEnforcer"), allowed_calldata(36, address_word(payee))),
            Caveat(fw.address("TimestampEnforcer"), timestamp(0, valid_until)),
            Caveat(fw.address("LimitedCallsEnforcer"), limited_calls(1)),
            Caveat(fw.address("ERC20BalanceChangeEnforcer"), erc20_balance_change(True, usdc, escrow, cap)),
        ),
        salt=salt,
    )


def fee_delegation(
    fw: DelegationFramework,
    *,
    provider: str,
    delegate: str,
    usdc: str,
    fee_collector: str,
    fee: int,
    valid_until: int,
    salt: int,
) -> Delegation:
    """The relayer's fee for a claim: `USDC.transfer(fee_collector, <= fee)` from the provider's
    account, at most `fee` in all, before `valid_until`, redeemed after the claim in the same
    `redeemDelegations` call (the claim pays the account first)."""
    return Delegation(
        delegate=delegate,
        delegator=provider,
        caveats=(
            Caveat(fw.address("ERC20TransferAmountEnforcer"), erc20_transfer_amount(usdc, fee)),
            Caveat(fw.address("AllowedCalldataEnforcer"), allowed_calldata(4, address_word(fee_collector))),
            Caveat(fw.address("TimestampEnforcer"), timestamp(0, valid_until)),
        ),
        salt=salt,
    )


def claim_redemptions(
    claim: Delegation,
    fee: Delegation | None,
    *,
    escrow: str,
    usdc: str,
    amount: int,
    payee: str,
    fee_collector: str,
    fee_amount: int,
) -> list[Redemption]:
    """The claim, then the relayer's fee, as `redeemDelegations` entries run by the provider's account."""
    entries = [Redemption(encode_context([claim]), (Execution(escrow, escrow_claim(amount, payee)),))]
    if fee is not None and fee_amount > 0:
        transfer = Execution(usdc, erc20_transfer(fee_collector, fee_amount))
        entries.append(Redemption(encode_context([fee]), (transfer,)))
    return entries


def _terms(fw: DelegationFramework, delegation: Delegation) -> dict[str, bytes]:
    """A delegation's caveat terms by enforcer name (`DelegationError` for an unknown enforcer)."""
    names = {to_checksum_address(a): n for n, a in fw.contracts.items()}
    out: dict[str, bytes] = {}
    for caveat in delegation.caveats:
        name = names.get(to_checksum_address(caveat.enforcer))
        if name is None:
            raise DelegationError(f"unsupported caveat enforcer {caveat.enforcer}")
        out[name] = caveat.terms
    return out


def _same(delegation: Delegation, expected: Delegation, what: str) -> None:
    if delegation.authority != ROOT_AUTHORITY or delegation.hash != expected.hash:
        raise DelegationError(
            f"the {what} delegation is not one this relay redeems: its caveats must be exactly the "
            "ones the relay proposes (the typed data endpoint)"
        )


@dataclass(frozen=True)
class ClaimGrant:
    """What a provider's claim delegation (`claim_delegation`) allows."""

    payee: str
    cap: int
    valid_until: int


def _read_proposed(
    fw: DelegationFramework,
    delegation: Delegation,
    what: str,
    read: Callable[[dict[str, bytes]], T],
    propose: Callable[..., Delegation],
) -> T:
    """What a delegation the relay proposed grants (`read` from its caveat terms), once it is
    exactly the one `propose` makes of that for the same delegator, delegate and salt;
    `DelegationError` otherwise."""
    terms = _terms(fw, delegation)
    try:
        granted = read(terms)
    except KeyError as exc:
        raise DelegationError(f"the {what} delegation has no {exc.args[0]} caveat") from None
    expected = propose(
        granted, provider=delegation.delegator, delegate=delegation.delegate, salt=delegation.salt
    )
    _same(delegation, expected, what)
    return granted


def read_claim(fw: DelegationFramework, delegation: Delegation, *, escrow: str, usdc: str) -> ClaimGrant:
    """The payee, cap and expiry of a claim delegation, which must be exactly `claim_delegation`'s
    shape for this escrow; `DelegationError` otherwise."""
    return _read_proposed(
        fw,
        delegation,
        "claim",
        lambda terms: ClaimGrant(
            payee=to_checksum_address(terms["AllowedCalldataEnforcer"][-20:]),
            cap=int.from_bytes(terms["ERC20BalanceChangeEnforcer"][-32:], "big"),
            valid_until=timestamp_bounds(terms["TimestampEnforcer"])[1],
        ),
        lambda grant, **accounts: claim_delegation(
            fw,
            escrow=escrow,
            usdc=usdc,
            payee=grant.payee,
            cap=grant.cap,
            valid_until=grant.valid_until,
            **accounts,
        ),
    )


def read_fee(fw: DelegationFramework, delegation: Delegation, *, usdc: str, fee_collector: str) -> int:
    """The fee a relayer-fee delegation (`fee_delegation`, paying `fee_collector`) allows."""
    fee, _ = _read_proposed(
        fw,
        delegation,
        "fee",
        lambda terms: (
            int.from_bytes(terms["ERC20TransferAmountEnforcer"][-32:], "big"),
            timestamp_bounds(terms["TimestampEnforcer"])[1],
        ),
        lambda granted, **accounts: fee_delegation(
            fw, usdc=usdc, fee_collector=fee_collector, fee=granted[0], valid_until=granted[1], **accounts
        ),
    )
    return fee


def disable_delegation(
    fw: DelegationFramework, *, delegator: str, delegate: str, target: Delegation, salt: int
) -> Delegation:
    """Revocation without ETH: a one-use grant letting `delegate` (a relayer) make the delegator's
    account call `DelegationManager.disableDelegation(target)`, and nothing else (`disableDelegation`
    only takes a call from the delegator itself)."""
    return Delegation(
        delegate=delegate,
        delegator=delegator,
        caveats=(
            Caveat(fw.address("AllowedTargetsEnforcer"), allowed_targets(fw.delegation_manager)),
            Caveat(fw.address("ExactCalldataEnforcer"), encode_disable(target)),
            Caveat(fw.address("LimitedCallsEnforcer"), limited_calls(1)),
        ),
        salt=salt,
    )


def check_disable(fw: DelegationFramework, grant: Delegation, target: Delegation) -> None:
    """`grant` must be exactly `disable_delegation(target)` from the target's delegator."""
    expected = disable_delegation(
        fw, delegator=target.delegator, delegate=grant.delegate, target=target, salt=grant.salt
    )
    if grant.delegator != target.delegator:
        raise DelegationError("only the delegation's delegator can disable it")
    _same(grant, expected, "disableDelegation")


def grant_target(fw: DelegationFramework, grant: Delegation, targets: Sequence[Delegation]) -> Delegation:
    """The one of `targets` that `grant` (a `disable_delegation` grant) disables."""
    for target in targets:
        with contextlib.suppress(DelegationError):
            check_disable(fw, grant, target)
            return target
    raise DelegationError("the grant disables none of these delegations")


def disable_redemption(off: Delegation, target: Delegation, delegation_manager: str) -> Redemption:
    """The `redeemDelegations` entry that runs a signed `disable_delegation` grant."""
    return Redemption(encode_context([off]), (Execution(delegation_manager, encode_disable(target)),))


def periodic_allowance(
    fw: DelegationFramework,
    *,
    consumer: str,
    delegate: str,
    usdc: str,
    period_amount: int,
    period_duration: int,
    start: int,
    expiry: int,
    salt: int,
    nonce: int = 0,
) -> Delegation:
    """A consumer's ERC-7715 `erc20-token-periodic` grant as MetaMask builds it, with the `expiry`,
    `redeemer` and `payee` rules: at most `period_amount` of USDC per `period_duration` seconds, by
    `USDC.transfer(delegate, …)` only, redeemed by `delegate` only, before `expiry`."""
    return Delegation(
        delegate=delegate,
        delegator=consumer,
        caveats=(
            Caveat(
                fw.address("ERC20PeriodTransferEnforcer"),
                erc20_period_transfer(usdc, period_amount, period_duration, start),
            ),
            Caveat(fw.address("ValueLteEnforcer"), value_lte(0)),
            Caveat(fw.address("NonceEnforcer"), _word(nonce)),
            Caveat(fw.address("TimestampEnforcer"), timestamp(0, expiry)),
            Caveat(fw.address("RedeemerEnforcer"), redeemer(delegate)),
            Caveat(fw.address("AllowedCalldataEnforcer"), allowed_calldata(4, address_word(delegate))),
        ),
        salt=salt,
    )


@dataclass(frozen=True)
class Allowance:
    """A consumer's periodic USDC allowance to the relay, as read from its permission context."""

    delegation: Delegation
    period: PeriodTerms
    expiry: int | None

    @property
    def hash(self) -> bytes:
        return self.delegation.hash


# Caveats a periodic allowance may carry besides its period, checked by `read_allowance`.
_ALLOWANCE_EXTRAS: Final = frozenset(
    {"ValueLteEnforcer", "NonceEnforcer", "TimestampEnforcer", "RedeemerEnforcer", "AllowedCalldataEnforcer"}
)


def read_allowance(
    fw: DelegationFramework, context: bytes, *, consumer: str, delegate: str, usdc: str
) -> Allowance:
    """Checks that a permission context (an ERC-7715 `erc20-token-periodic` grant's `context`) is
    one signed root delegation from `consumer` to `delegate` whose caveats the relay can redeem
    toward the consumer's deposit: a USDC period allowance, native value 0, transfers to `delegate`
    only (when a payee is set), `delegate` as redeemer (when one is set), and nothing else.
    Raises `DelegationError` naming what is wrong."""
    chain = decode_context(context)
    if len(chain) != 1:
        raise DelegationError("the permission context must hold exactly one (root) delegation")
    (delegation,) = chain
    if delegation.delegator != to_checksum_address(consumer):
        raise DelegationError(f"the delegation's delegator {delegation.delegator} is not {consumer}")
    if delegation.delegate != to_checksum_address(delegate):
        raise DelegationError(f"the delegation must name this relay's operator {delegate} as delegate")
    if delegation.authority != ROOT_AUTHORITY:
        raise DelegationError("the delegation must be a root delegation (authority 0xff…ff)")
    if not delegation.signature:
        raise DelegationError("the delegation is not signed")
    names = {to_checksum_address(a): n for n, a in fw.contracts.items()}
    payee_rule = allowed_calldata(4, address_word(delegate))
    period: PeriodTerms | None = None
    expiry: int | None = None
    for caveat in delegation.caveats:
        name = names.get(to_checksum_address(caveat.enforcer))
        if name == "ERC20PeriodTransferEnforcer":
            if period is not None:
                raise DelegationError("the delegation holds two period allowances")
            period = PeriodTerms.parse(caveat.terms)
            if period.token != to_checksum_address(usdc):
                raise DelegationError(f"the period allowance is for {period.token}, not USDC {usdc}")
        elif name == "TimestampEnforcer":
            _after, before = timestamp_bounds(caveat.terms)
            expiry = before or expiry
        elif name == "AllowedCalldataEnforcer" and caveat.terms != payee_rule:
            raise DelegationError(f"the payee rule must name this relay's operator {delegate}")
        elif name == "RedeemerEnforcer" and _address_bytes(delegate) not in {
            caveat.terms[i : i + 20] for i in range(0, len(caveat.terms), 20)
        }:
            raise DelegationError(f"the redeemer rule must include this relay's operator {delegate}")
        elif name == "ValueLteEnforcer" and caveat.terms != value_lte(0):
            raise DelegationError("the delegation must allow no native value")
        elif name not in _ALLOWANCE_EXTRAS and name != "ERC20PeriodTransferEnforcer":
            raise DelegationError(f"unsupported caveat enforcer {caveat.enforcer}")
    if period is None:
        raise DelegationError("the delegation holds no ERC20PeriodTransferEnforcer allowance")
    return Allowance(delegation, period, expiry)


def top_up_redemptions(
    allowance_context: bytes, *, usdc: str, escrow: str, operator: str, consumer: str, amount: int
) -> list[Redemption]:
    """A top-up in one `redeemDelegations` call sent by the operator's own smart account: the
    consumer's account transfers `amount` to the operator under the allowance, then the operator's
    account (an empty context: its own authority) approves and deposits it for the consumer."""
    pull = Execution(usdc, erc20_transfer(operator, amount))
    deposit = (
        Execution(usdc, erc20_approve(escrow, amount)),
        Execution(escrow, escrow_deposit(amount, consumer)),
    )
    return [Redemption(allowance_context, (pull,)), Redemption(encode_context([]), deposit)]
