"""Shared pieces of the ape scripts: typed click parameters, the connected network's deployment,
contract handles, EIP-712 signing with an ape account and turning reverts into click errors.

`ape run` skips files starting with `_`, and imports the others as `scripts.<name>` with the project
root on `sys.path`, which is how they import this module.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from eth_account.messages import SignableMessage
from eth_utils import is_checksum_address, is_hex_address, keccak, to_checksum_address
from quotra.chain import delegation as dlg
from quotra.chain import eip712
from quotra.chain.deployment import (
    DelegationFramework,
    Deployment,
    DeploymentError,
    deployment_path,
    load_for_chain,
)
from quotra.money import format_usdc, parse_usdc

F = TypeVar("F", bound=Callable[..., Any])


def _ape_logs_to_stderr() -> None:
    """Results go to stdout (`sign-permission > permission.json`), ape's log lines to stderr.

    ape 0.8 looks its echo arguments up by level *name* but keys them by `LogLevel`, so every
    record lands on stdout; keying them by name sends them to stderr."""
    from ape.logging import CLICK_ECHO_KWARGS

    for level in ("error", "warning", "success", "info", "debug"):
        CLICK_ECHO_KWARGS[level] = {"err": True}  # type: ignore[index]


_ape_logs_to_stderr()

ANVIL_CLIENT_PREFIX = "anvil/"
# A signed item's salt stays below 2**53 so JavaScript clients read the JSON number exactly.
SALT_BITS = 52


# ---- click parameter types -------------------------------------------------------------------


class UsdcAmount(click.ParamType):
    """Human USDC (`1.50`) parsed exactly into atomic units (1_500_000)."""

    name = "USDC"

    def __init__(self, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            atomic = parse_usdc(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if atomic == 0 and not self.allow_zero:
            self.fail("amount must be above zero", param, ctx)
        return atomic


class Address(click.ParamType):
    """A 0x-prefixed 20-byte address (any case), returned checksummed."""

    name = "ADDRESS"

    def __init__(self, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        if not (text.startswith("0x") and is_hex_address(text)):
            self.fail(f"not an address: {value!r}", param, ctx)
        # Mixed case is an EIP-55 checksum; a wrong one means a typo somewhere.
        if text[2:] not in (text[2:].lower(), text[2:].upper()) and not is_checksum_address(text):
            self.fail(f"bad checksum in address {value!r}", param, ctx)
        address = to_checksum_address(text)
        if int(address, 16) == 0 and not self.allow_zero:
            self.fail("the zero address is not allowed here", param, ctx)
        return address


class Duration(click.ParamType):
    """Seconds, written as `3600`, `90s`, `30m`, `24h` or `7d`."""

    name = "DURATION"
    _UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(value))
        if not match:
            self.fail(f"not a duration: {value!r} (use e.g. 3600, 30m, 24h, 7d)", param, ctx)
        return int(match.group(1)) * self._UNITS[match.group(2)]


class PositiveDays(click.ParamType):
    """A number of days (fractions allowed), as seconds."""

    name = "DAYS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            days = Decimal(str(value))
        except InvalidOperation:
            self.fail(f"not a number of days: {value!r}", param, ctx)
        if not days.is_finite() or days <= 0 or days > 3650:
            self.fail("days must be above 0 and at most 3650", param, ctx)
        return int(days * 86400)


USDC = UsdcAmount()
ADDRESS = Address()


def yes_option(f: F) -> F:
    return click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")(f)


def confirm(yes: bool, message: str) -> None:
    """Ask before an irreversible step (aborts on no, or when stdin is not a terminal)."""
    if not yes:
        click.confirm(message, abort=True)


def usdc_text(atomic: int) -> str:
    return f"{format_usdc(atomic)} USDC"


# ---- the connected network -------------------------------------------------------------------


def connected_deployment_path() -> Path:
    from ape import networks

    network = networks.provider.network
    return deployment_path(network.ecosystem.name, network.name)


def load_deployment() -> Deployment:
    """The deployment of the connected network, refused if it was written for another chain."""
    from ape import chain

    path = connected_deployment_path()
    try:
        return load_for_chain(path, chain.chain_id)
    except DeploymentError as exc:
        raise click.ClickException(f"{exc}. Deploy first: ape run deploy escrow --network ...") from None


def escrow_contract(deployment: Deployment) -> Any:
    from ape import project

    return project.QuotraEscrow.at(deployment.escrow)


def usdc_contract(address: str) -> Any:
    """USDC through MockUSDC's ABI (the ERC-20 / EIP-3009 / `version()` entries are FiatToken's)."""
    from ape import project

    return project.MockUSDC.at(address)


def is_anvil() -> bool:
    from ape import networks

    try:
        version = str(networks.provider.web3.client_version)
    except Exception:  # a node without web3_clientVersion is not anvil
        return False
    return version.lower().startswith(ANVIL_CLIENT_PREFIX)


def rpc(method: str, *params: Any) -> Any:
    """A raw JSON-RPC request through ape's provider (anvil_* methods)."""
    from ape import networks

    return networks.provider.make_request(method, list(params))


def head_timestamp() -> int:
    from ape import chain

    return int(chain.blocks.head.timestamp)


@contextmanager
def reverts_as_click_errors(action: str) -> Iterator[None]:
    """A revert (found while estimating gas, so before anything is sent) becomes a one-line error."""
    from ape.exceptions import ApeException, ContractLogicError

    try:
        yield
    except ContractLogicError as exc:
        raise click.ClickException(f"{action} would revert: {exc.message or exc}") from None
    except ApeException as exc:
        raise click.ClickException(f"{action} failed: {exc}") from None


def require_owner(escrow: Any, account: Any) -> None:
    owner = escrow.owner()
    if owner != account.address:
        raise click.UsageError(f"{account.address} is not the escrow owner ({owner})")


# ---- signed items (SpendPermission, Delegation) ----------------------------------------------


def new_salt() -> int:
    return secrets.randbits(SALT_BITS)


def sign_typed(
    account: Any, domain: eip712.Domain, primary: str, message: dict[str, Any]
) -> eip712.Signature:
    """Sign an EIP-712 message with an ape account (test, keyfile or hardware).

    The account signs a `SignableMessage` built from `quotra.chain.eip712`'s domain separator and
    struct hash, so what it signs is exactly `eip712.digest(...)`; the result is checked by
    recovery before anyone sees it.
    """
    return _sign_struct(account, domain, eip712.struct_hash(primary, message))


def _sign_struct(account: Any, domain: eip712.Domain, struct_hash: bytes) -> eip712.Signature:
    signed = account.sign_message(SignableMessage(version=b"\x01", header=domain.separator, body=struct_hash))
    if signed is None:
        raise click.ClickException("the account did not sign")
    signature = eip712.Signature.from_bytes(signed.encode_rsv())
    if eip712.recover(keccak(b"\x19\x01" + domain.separator + struct_hash), signature) != account.address:
        raise click.ClickException("the signature does not recover to the account")
    return signature


def sign_framework_delegation(
    account: Any, deployment: Deployment, delegation: dlg.Delegation
) -> dict[str, Any]:
    """Sign a Delegation Framework `Delegation` (EIP-712 under the DelegationManager's domain) with
    an ape account; `{message, signature}` as the relay takes it."""
    fw = require_framework(deployment)
    domain = dlg.domain(deployment.chain_id, fw.delegation_manager)
    signature = _sign_struct(account, domain, delegation.hash)
    return {"message": delegation.message(), "signature": signature.hex}


def require_framework(deployment: Deployment) -> DelegationFramework:
    if deployment.delegation_framework is None:
        raise click.UsageError("the deployment records no Delegation Framework on this chain")
    return deployment.delegation_framework


def eip7702_upgrade(account: Any, deployment: Deployment) -> dict[str, Any] | None:
    """The account's signed EIP-7702 authorization to become MetaMask's stateless DeleGator, or
    None when its code already delegates there (a relayer sends it: no ETH needed)."""
    from ape import networks

    fw = require_framework(deployment)
    w3 = networks.provider.web3
    if dlg.is_delegated_to(bytes(w3.eth.get_code(account.address)), fw.stateless_delegator):
        return None
    nonce = int(w3.eth.get_transaction_count(account.address))
    signed = account.sign_authorization(fw.stateless_delegator, deployment.chain_id, nonce)
    if signed is None:
        raise click.ClickException("the account did not sign the EIP-7702 authorization")
    r, s = (int.from_bytes(bytes(x), "big") for x in (signed.r, signed.s))
    auth = dlg.SetCodeAuthorization(deployment.chain_id, fw.stateless_delegator, nonce, int(signed.v), r, s)
    if auth.authority != account.address:
        raise click.ClickException("the EIP-7702 authorization does not recover to the account")
    return auth.as_json()


def signed_item(
    deployment: Deployment, primary: str, message: dict[str, Any], signature: eip712.Signature
) -> dict[str, Any]:
    """The JSON a signed permission/delegation is handed around as (the relay registers it)."""
    domain = deployment.escrow_domain
    return {
        "primaryType": primary,
        "chain_id": deployment.chain_id,
        "escrow": deployment.escrow,
        "domain": domain.as_dict(),
        "message": eip712.typed_data(domain, primary, message)["message"],
        "digest": "0x" + eip712.digest(domain, primary, message).hex(),
        "signature": signature.hex,
    }


def read_signed_item(path: Path, primary: str, deployment: Deployment) -> dict[str, Any]:
    """Read a signed item written by `signed_item`, refusing one for another type, chain or escrow."""
    try:
        item = json.loads(path.read_text(encoding="utf-8"))
        message = item["message"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="file") from None
    if item.get("primaryType") != primary:
        raise click.BadParameter(f"{path} holds a {item.get('primaryType')}, not a {primary}")
    if item.get("chain_id") != deployment.chain_id or str(item.get("escrow", "")).lower() != (
        deployment.escrow.lower()
    ):
        raise click.BadParameter(f"{path} is for another chain or escrow than {deployment.escrow}")
    fields = eip712.TYPES[primary]
    try:
        parsed = {
            name: (to_checksum_address(message[name]) if typ == "address" else int(message[name]))
            for name, typ in fields
        }
    except (KeyError, ValueError, TypeError) as exc:
        raise click.BadParameter(f"{path}: bad {primary} message: {exc}") from None
    return cast(dict[str, Any], parsed)


def parse_digest(text: str | None) -> bytes:
    """A 32-byte EIP-712 digest written as 0x + 64 hex characters."""
    try:
        item = bytes.fromhex((text or "").removeprefix("0x"))
    except ValueError:
        item = b""
    if len(item) != 32:
        raise click.BadParameter("a digest is 0x followed by 64 hex characters", param_hint="--digest")
    return item


def echo_json(data: Any, output: Path | None) -> None:
    text = json.dumps(data, indent=2)
    if output is not None:
        output.write_text(text + "\n", encoding="utf-8")
        click.echo(f"written to {output}", err=True)
    click.echo(text)


__all__ = [
    "ADDRESS",
    "USDC",
    "Address",
    "Duration",
    "PositiveDays",
    "UsdcAmount",
    "confirm",
    "connected_deployment_path",
    "echo_json",
    "eip7702_upgrade",
    "escrow_contract",
    "format_usdc",
    "head_timestamp",
    "is_anvil",
    "load_deployment",
    "new_salt",
    "parse_digest",
    "read_signed_item",
    "require_framework",
    "require_owner",
    "reverts_as_click_errors",
    "rpc",
    "sign_framework_delegation",
    "sign_typed",
    "signed_item",
    "usdc_contract",
    "usdc_text",
    "yes_option",
]


def revoke_signed_item(
    account: Any,
    path: Path | None,
    digest: str | None,
    *,
    primary: str,
    signer_field: str,
    revoke_method: str,
    to_tuple: Callable[[dict[str, Any]], tuple[Any, ...]],
    yes: bool,
) -> bytes:
    """Revoke a signed permission or delegation on-chain, named by its JSON file or its digest."""
    deployment = load_deployment()
    escrow = escrow_contract(deployment)
    if (path is None) == (digest is None):
        raise click.UsageError(f"pass exactly one of --{primary.lower()}-file and --digest")
    if path is not None:
        message = read_signed_item(path, primary, deployment)
        if message[signer_field] != account.address:
            raise click.BadParameter(
                f"the item's {signer_field} is {message[signer_field]}, not {account.address}"
            )
        item = eip712.digest(deployment.escrow_domain, primary, message)
        confirm(yes, f"Revoke {primary} 0x{item.hex()}?")
        with reverts_as_click_errors(revoke_method):
            getattr(escrow, revoke_method)(to_tuple(message), sender=account)
    else:
        item = parse_digest(digest)
        confirm(yes, f"Revoke 0x{item.hex()}?")
        with reverts_as_click_errors("revoke"):
            escrow.revoke(item, sender=account)
    click.echo(f"revoked 0x{item.hex()}")
    return item
