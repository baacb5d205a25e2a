"""x402 `exact` payments on EVM: the offer, the wire codec and the stateless checks.

The relay is its own facilitator. This module builds the `402` offer (v2 header and
v1 body), decodes a paid retry (`PAYMENT-SIGNATURE` or legacy `X-PAYMENT`) with the
`x402` package's models, and verifies everything that needs no I/O: the echoed
requirements, scheme, network, asset, payee, exact amount, time window, and the
EIP-3009 signature (low-s, recovered with coincurve). Balance and nonce checks need
the chain and the database and live in the payment service.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final

from pydantic import ValidationError
from x402.http.constants import (
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    X_PAYMENT_HEADER,
    X_PAYMENT_RESPONSE_HEADER,
)
from x402.mechanisms.evm import constants as evm_errors
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequirementsV1

from quotra import bounds
from quotra.chain import eip712

SCHEME: Final = "exact"

# Reasons, spelled as the x402 SDK spells them so stock clients recognise them.
INVALID_PAYLOAD: Final = "invalid_payload"
UNSUPPORTED_SCHEME: Final = evm_errors.ERR_UNSUPPORTED_SCHEME
NETWORK_MISMATCH: Final = evm_errors.ERR_NETWORK_MISMATCH
ASSET_MISMATCH: Final = "invalid_exact_evm_payload_asset_mismatch"
REQUIREMENTS_MISMATCH: Final = "invalid_exact_evm_payload_requirements_mismatch"
RECIPIENT_MISMATCH: Final = evm_errors.ERR_RECIPIENT_MISMATCH
VALUE_MISMATCH: Final = evm_errors.ERR_AUTHORIZATION_VALUE_MISMATCH
VALID_BEFORE_EXPIRED: Final = evm_errors.ERR_VALID_BEFORE_EXPIRED
VALID_AFTER_FUTURE: Final = evm_errors.ERR_VALID_AFTER_FUTURE
INVALID_SIGNATURE: Final = evm_errors.ERR_INVALID_SIGNATURE
# x402 carries a 65-byte ECDSA signature by the payer's key: a smart account that signs otherwise
# (a multisig, a passkey) pays through the prepaid path, whose checks accept ERC-1271.
SMART_ACCOUNT_HINT: Final = (
    " (a smart account that does not sign with its own key pays prepaid instead: a deposit, "
    "POST /v1/account/deposits or a periodic allowance, and an API key)"
)
NONCE_ALREADY_USED: Final = evm_errors.ERR_NONCE_ALREADY_USED
INSUFFICIENT_BALANCE: Final = evm_errors.ERR_INSUFFICIENT_BALANCE
# Ours, in the stock codes' style: the payer let an earlier authorization go unpaid.
PAYER_UNPAID: Final = "invalid_exact_evm_payer_unpaid"

_V1_NAMES: Final = {chain_id: name for name, chain_id in V1_NETWORK_CHAIN_IDS.items()}
_MAX_HEADER_BYTES: Final = 8_192
_DECIMAL: Final = re.compile(r"[0-9]{1,78}")


class X402Error(Exception):
    """A payment refused before serving; `reason` is the x402 error code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class PaymentTerms:
    """What this relay accepts: read from the deployment and the chain once, at start."""

    chain_id: int
    asset: str  # USDC
    asset_name: str  # USDC's EIP-712 domain name, read from the chain ("USDC" on Base Sepolia)
    asset_version: str
    pay_to: str  # the escrow
    max_timeout_seconds: int = 300
    # An authorization must stay valid this long after verification, so it can still settle.
    settle_margin_seconds: int = 60

    @property
    def network(self) -> str:
        return f"eip155:{self.chain_id}"

    @property
    def v1_network(self) -> str | None:
        return _V1_NAMES.get(self.chain_id)

    @cached_property
    def domain(self) -> eip712.Domain:
        return eip712.Domain(self.asset_name, self.asset_version, self.chain_id, self.asset)

    @cached_property
    def _asset_key(self) -> str:
        return self.asset.lower()

    @cached_property
    def _pay_to_key(self) -> str:
        return self.pay_to.lower()

    def requirements(self, amount: int) -> PaymentRequirements:
        return PaymentRequirements(
            scheme=SCHEME,
            network=self.network,
            asset=self.asset,
            amount=str(amount),
            pay_to=self.pay_to,
            max_timeout_seconds=self.max_timeout_seconds,
            extra={"name": self.asset_name, "version": self.asset_version},
        )

    def requirements_v1(self, amount: int, resource: str, description: str) -> PaymentRequirementsV1 | None:
        if self.v1_network is None:
            return None
        return PaymentRequirementsV1(
            scheme=SCHEME,
            network=self.v1_network,
            max_amount_required=str(amount),
            resource=resource,
            description=description,
            mime_type="application/json",
            pay_to=self.pay_to,
            max_timeout_seconds=self.max_timeout_seconds,
            asset=self.asset,
            extra={"name": self.asset_name, "version": self.asset_version},
        )


def _b64json(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode()


def payment_required(
    terms: PaymentTerms,
    amount: int,
    *,
    resource: str,
    description: str,
    error: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The `PAYMENT-REQUIRED` header value (v2) and the JSON body (v1 form) of a `402`."""
    offer = PaymentRequired(
        error=error,
        resource=ResourceInfo(url=resource, description=description, mime_type="application/json"),
        accepts=[terms.requirements(amount)],
    )
    header = base64.b64encode(offer.model_dump_json(by_alias=True, exclude_none=True).encode()).decode()
    body: dict[str, Any] = {"x402Version": 1, "accepts": []}
    v1 = terms.requirements_v1(amount, resource, description)
    if v1 is not None:
        body["accepts"] = [v1.model_dump(by_alias=True, exclude_none=True)]
    if error is not None:
        body["error"] = error
    return header, body


def settle_response(
    *, success: bool, payer: str, network: str, transaction: str, amount: int | None = None, **extra: Any
) -> str:
    """A `PAYMENT-RESPONSE` header value. `transaction` is a hash, or "" while settlement is pending."""
    body: dict[str, Any] = {
        "success": success,
        "payer": payer,
        "transaction": transaction,
        "network": network,
    }
    if amount is not None:
        body["amount"] = str(amount)
    body.update({k: v for k, v in extra.items() if v is not None})
    return _b64json(body)


RESPONSE_HEADERS: Final = {2: PAYMENT_RESPONSE_HEADER, 1: X_PAYMENT_RESPONSE_HEADER}


@dataclass(frozen=True)
class Authorization:
    """A verified EIP-3009 `TransferWithAuthorization` paying the escrow."""

    payer: str  # checksummed
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes
    signature: eip712.Signature

    @property
    def nonce_hex(self) -> str:
        return "0x" + self.nonce.hex()


@dataclass(frozen=True)
class _Unsigned:
    payer: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes


@dataclass(frozen=True)
class PaidRequest:
    """A decoded paid retry."""

    version: int
    scheme: str
    network: str
    accepted: PaymentRequirements | None  # v2 echoes the requirements it chose
    payload: Mapping[str, Any]


def decode(headers: Mapping[str, str]) -> PaidRequest | None:
    """The payment carried by a request, or None if it carries none. Raises `X402Error`."""
    raw = headers.get(PAYMENT_SIGNATURE_HEADER.lower())
    header_version = 2
    if raw is None:
        raw = headers.get(X_PAYMENT_HEADER.lower())
        header_version = 1
    if raw is None:
        return None
    if len(raw) > _MAX_HEADER_BYTES:
        raise X402Error(INVALID_PAYLOAD, "payment header is too large")
    try:
        data = bounds.loads(base64.b64decode(raw.strip(), validate=True))
    except (binascii.Error, ValueError) as exc:
        raise X402Error(INVALID_PAYLOAD, "payment header is not base64-encoded JSON") from exc
    if not isinstance(data, dict):
        raise X402Error(INVALID_PAYLOAD, "payment header must encode a JSON object")
    version = data.get("x402Version", header_version)
    try:
        if version == 2:
            v2 = PaymentPayload.model_validate(data)
            return PaidRequest(2, v2.accepted.scheme, v2.accepted.network, v2.accepted, v2.payload)
        if version == 1:
            v1 = PaymentPayloadV1.model_validate(data)
            return PaidRequest(1, v1.scheme, v1.network, None, v1.payload)
    except ValidationError as exc:
        raise X402Error(INVALID_PAYLOAD, "payment payload does not match the x402 schema") from exc
    raise X402Error(INVALID_PAYLOAD, f"unsupported x402Version {version!r}")


def _uint(value: Any, name: str) -> int:
    """A uint256 of the authorization, written as x402 writes it: a string of decimal digits."""
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
        raise X402Error(INVALID_PAYLOAD, f"authorization.{name} must be an integer as a decimal string")
    number = int(value)
    if number > bounds.UINT256_MAX:
        raise X402Error(INVALID_PAYLOAD, f"authorization.{name} is out of range")
    return number


def _address(value: Any, name: str) -> str:
    if not isinstance(value, str) or len(value) != 42 or not value.startswith("0x"):
        raise X402Error(INVALID_PAYLOAD, f"authorization.{name} must be a 0x-prefixed address")
    try:
        int(value, 16)
    except ValueError as exc:
        raise X402Error(INVALID_PAYLOAD, f"authorization.{name} must be a 0x-prefixed address") from exc
    return value


def _same_requirements(accepted: PaymentRequirements, offered: PaymentRequirements) -> bool:
    """The echo must equal the offer; its `extra` may be a subset of ours."""
    return (
        accepted.scheme == offered.scheme
        and accepted.network == offered.network
        and accepted.amount == offered.amount
        and accepted.asset.lower() == offered.asset.lower()
        and accepted.pay_to.lower() == offered.pay_to.lower()
        and accepted.max_timeout_seconds == offered.max_timeout_seconds
        and all(offered.extra.get(k) == v for k, v in (accepted.extra or {}).items())
    )


def verify(paid: PaidRequest, terms: PaymentTerms, amount: int, now: int) -> Authorization:
    """Check a paid retry against the offer for `amount`. Raises `X402Error` naming the reason."""
    if paid.scheme != SCHEME:
        raise X402Error(UNSUPPORTED_SCHEME, f"scheme {paid.scheme!r} is not accepted; use 'exact'")
    expected_network = terms.network if paid.version == 2 else terms.v1_network
    if paid.network != expected_network:
        raise X402Error(
            NETWORK_MISMATCH, f"network {paid.network!r} is not accepted; use {expected_network!r}"
        )
    if paid.accepted is not None:
        if paid.accepted.asset.lower() != terms._asset_key:
            raise X402Error(ASSET_MISMATCH, "the payment is not in this relay's USDC")
        if not _same_requirements(paid.accepted, terms.requirements(amount)):
            raise X402Error(REQUIREMENTS_MISMATCH, "accepted requirements differ from the offer")
    unsigned = _unsigned(paid, terms)
    if unsigned.value != amount:
        raise X402Error(
            VALUE_MISMATCH, f"the authorization pays {unsigned.value}, the price is exactly {amount}"
        )
    if unsigned.valid_after >= now:
        raise X402Error(VALID_AFTER_FUTURE, "the authorization is not valid yet")
    if unsigned.valid_before < now + terms.settle_margin_seconds:
        raise X402Error(VALID_BEFORE_EXPIRED, "the authorization expires too soon to settle")
    if unsigned.valid_before > now + terms.max_timeout_seconds + terms.settle_margin_seconds:
        raise X402Error(VALID_BEFORE_EXPIRED, "the authorization is valid for longer than maxTimeoutSeconds")
    return _signed(unsigned, paid, terms)


def signed_authorization(paid: PaidRequest, terms: PaymentTerms) -> Authorization:
    """The payment's authorization, if it pays the escrow and its payer signed it under USDC's
    domain, whatever its amount and time window (to prove who is asking about a call it paid
    for). Raises `X402Error`."""
    return _signed(_unsigned(paid, terms), paid, terms)


def _unsigned(paid: PaidRequest, terms: PaymentTerms) -> _Unsigned:
    """The authorization's fields, checked for form and payee; its signature not yet checked."""
    auth = paid.payload.get("authorization")
    if not isinstance(auth, Mapping):
        raise X402Error(INVALID_PAYLOAD, "payload.authorization is missing")
    payer = _address(auth.get("from"), "from")
    to = _address(auth.get("to"), "to")
    value = _uint(auth.get("value"), "value")
    valid_after = _uint(auth.get("validAfter"), "validAfter")
    valid_before = _uint(auth.get("validBefore"), "validBefore")
    nonce_raw = auth.get("nonce")
    if not isinstance(nonce_raw, str):
        raise X402Error(INVALID_PAYLOAD, "authorization.nonce must be 32 bytes of hex")
    try:
        nonce = bytes.fromhex(nonce_raw.removeprefix("0x"))
    except ValueError as exc:
        raise X402Error(INVALID_PAYLOAD, "authorization.nonce must be 32 bytes of hex") from exc
    if len(nonce) != 32:
        raise X402Error(INVALID_PAYLOAD, "authorization.nonce must be 32 bytes of hex")
    if to.lower() != terms._pay_to_key:
        raise X402Error(RECIPIENT_MISMATCH, "the authorization does not pay the escrow")
    return _Unsigned(payer, to, value, valid_after, valid_before, nonce)


def _signed(unsigned: _Unsigned, paid: PaidRequest, terms: PaymentTerms) -> Authorization:
    sig_raw = paid.payload.get("signature")
    if not isinstance(sig_raw, str):
        raise X402Error(INVALID_SIGNATURE, "payload.signature is missing")
    try:
        signature = eip712.Signature.from_bytes(sig_raw)
    except (eip712.InvalidSignature, ValueError) as exc:
        raise X402Error(INVALID_SIGNATURE, f"invalid signature: {exc}{SMART_ACCOUNT_HINT}") from exc
    message = {
        "from": unsigned.payer,
        "to": unsigned.to,
        "value": unsigned.value,
        "validAfter": unsigned.valid_after,
        "validBefore": unsigned.valid_before,
        "nonce": unsigned.nonce,
    }
    try:
        signer = eip712.recover(eip712.digest(terms.domain, "TransferWithAuthorization", message), signature)
    except eip712.InvalidSignature as exc:
        raise X402Error(INVALID_SIGNATURE, "the signature does not recover") from exc
    if signer.lower() != unsigned.payer.lower():
        raise X402Error(
            INVALID_SIGNATURE, f"the authorization was not signed by its payer{SMART_ACCOUNT_HINT}"
        )
    return Authorization(
        signer,
        unsigned.to,
        unsigned.value,
        unsigned.valid_after,
        unsigned.valid_before,
        unsigned.nonce,
        signature,
    )
