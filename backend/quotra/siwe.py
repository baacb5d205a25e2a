"""Sign-In with Ethereum (EIP-4361): message builder, parser and verifier.

The verifier checks domain, URI, chain, times and the signature: ecrecover for EOAs, then
ERC-1271 `isValidSignature` for contract wallets through an injectable checker. The nonce is
consumed by the caller (it lives in the database) after everything else has passed.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from eth_account import Account
from eth_account.messages import defunct_hash_message, encode_defunct
from eth_utils import is_checksum_address, to_checksum_address

ERC1271_MAGIC = bytes.fromhex("1626ba7e")
_HEADER = " wants you to sign in with your Ethereum account:"
_NONCE = re.compile(r"^[A-Za-z0-9]{8,}$")
_FIELDS = {
    "URI": "uri",
    "Version": "version",
    "Chain ID": "chain_id",
    "Nonce": "nonce",
    "Issued At": "issued_at",
    "Expiration Time": "expiration_time",
    "Not Before": "not_before",
    "Request ID": "request_id",
}


class SiweError(Exception):
    """The message or its signature is not acceptable; the text says why."""


def _parse_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SiweError(f"bad timestamp {value!r}") from exc
    if parsed.tzinfo is None:
        raise SiweError(f"timestamp without timezone {value!r}")
    return parsed


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class SiweMessage:
    domain: str
    address: str
    uri: str
    chain_id: int
    nonce: str
    issued_at: str
    statement: str | None = None
    version: str = "1"
    expiration_time: str | None = None
    not_before: str | None = None
    request_id: str | None = None
    resources: list[str] = field(default_factory=list)
    scheme: str | None = None

    def to_text(self) -> str:
        prefix = f"{self.scheme}://{self.domain}" if self.scheme else self.domain
        lines = [prefix + _HEADER, self.address, ""]
        if self.statement:
            lines += [self.statement, ""]
        else:
            lines.append("")
        lines += [
            f"URI: {self.uri}",
            f"Version: {self.version}",
            f"Chain ID: {self.chain_id}",
            f"Nonce: {self.nonce}",
            f"Issued At: {self.issued_at}",
        ]
        if self.expiration_time:
            lines.append(f"Expiration Time: {self.expiration_time}")
        if self.not_before:
            lines.append(f"Not Before: {self.not_before}")
        if self.request_id is not None:
            lines.append(f"Request ID: {self.request_id}")
        if self.resources:
            lines.append("Resources:")
            lines += [f"- {r}" for r in self.resources]
        return "\n".join(lines)

    @classmethod
    def parse(cls, text: str) -> SiweMessage:
        lines = text.split("\n")
        if len(lines) < 8 or not lines[0].endswith(_HEADER):
            raise SiweError("not an EIP-4361 message")
        origin = lines[0][: -len(_HEADER)]
        scheme, _, domain = origin.rpartition("://")
        address = lines[1]
        if not re.fullmatch(r"0x[0-9a-fA-F]{40}", address) or not is_checksum_address(address):
            raise SiweError("address must be an EIP-55 checksummed address")
        if lines[2] != "":
            raise SiweError("malformed message: blank line expected after the address")
        index = 3
        statement = None
        if lines[index] == "":
            index += 1
        elif not lines[index].startswith("URI: "):
            statement = lines[index]
            if index + 1 >= len(lines) or lines[index + 1] != "":
                raise SiweError("malformed message: statement must be one line followed by a blank line")
            index += 2
        values: dict[str, str] = {}
        resources: list[str] = []
        rest = lines[index:]
        position = 0
        while position < len(rest):
            line = rest[position]
            if line == "Resources:":
                resources = [r[2:] for r in rest[position + 1 :] if r.startswith("- ")]
                if len(resources) != len(rest) - position - 1:
                    raise SiweError("malformed resources list")
                break
            key, sep, value = line.partition(": ")
            if not sep or key not in _FIELDS or _FIELDS[key] in values:
                raise SiweError(f"unexpected line {line!r}")
            values[_FIELDS[key]] = value
            position += 1
        for required in ("uri", "version", "chain_id", "nonce", "issued_at"):
            if required not in values:
                raise SiweError(f"missing field {required}")
        if values["version"] != "1":
            raise SiweError("unsupported version")
        if not re.fullmatch(r"[0-9]{1,20}", values["chain_id"]):  # ASCII digits, within uint64
            raise SiweError("bad chain id")
        try:
            _origin(values["uri"])
        except ValueError as exc:  # e.g. an unclosed IPv6 bracket
            raise SiweError("bad URI") from exc
        if not _NONCE.match(values["nonce"]):
            raise SiweError("bad nonce")
        for key in ("issued_at", "expiration_time", "not_before"):
            if key in values:
                _parse_time(values[key])
        return cls(
            domain=domain,
            address=address,
            statement=statement,
            uri=values["uri"],
            version=values["version"],
            chain_id=int(values["chain_id"]),
            nonce=values["nonce"],
            issued_at=values["issued_at"],
            expiration_time=values.get("expiration_time"),
            not_before=values.get("not_before"),
            request_id=values.get("request_id"),
            resources=resources,
            scheme=scheme or None,
        )


Erc1271Fn = Callable[[str, bytes, bytes], Awaitable[bool]]


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


@dataclass(frozen=True)
class SiweVerifier:
    domain: str
    uri: str
    chain_id: int
    erc1271: Erc1271Fn | None = None
    max_age: timedelta = timedelta(minutes=10)
    clock_skew: timedelta = timedelta(seconds=60)

    async def verify(self, text: str, signature_hex: str, *, now: datetime | None = None) -> SiweMessage:
        """Everything except the nonce's single use; returns the parsed message."""
        message = SiweMessage.parse(text)
        now = now or datetime.now(UTC)
        if message.domain.lower() != self.domain.lower():
            raise SiweError("domain does not match this server")
        if _origin(message.uri) != _origin(self.uri):
            raise SiweError("URI does not match this server")
        if message.chain_id != self.chain_id:
            raise SiweError("wrong chain id")
        issued = _parse_time(message.issued_at)
        if issued > now + self.clock_skew:
            raise SiweError("message issued in the future")
        if issued < now - self.max_age:
            raise SiweError("message too old")
        if message.expiration_time and _parse_time(message.expiration_time) <= now:
            raise SiweError("message expired")
        if message.not_before and _parse_time(message.not_before) > now + self.clock_skew:
            raise SiweError("message not yet valid")
        try:
            signature = bytes.fromhex(signature_hex.removeprefix("0x"))
        except ValueError as exc:
            raise SiweError("signature is not hex") from exc
        if await self._signature_ok(message, text, signature):
            return message
        raise SiweError("signature does not match the address")

    async def _signature_ok(self, message: SiweMessage, text: str, signature: bytes) -> bool:
        signable = encode_defunct(text=text)
        if len(signature) == 65:
            try:
                recovered = Account.recover_message(signable, signature=signature)
            except Exception:  # malformed r/s/v: maybe a contract-wallet signature
                recovered = None
            if recovered is not None and to_checksum_address(recovered) == message.address:
                return True
        if self.erc1271 is None:
            return False
        return await self.erc1271(message.address, bytes(defunct_hash_message(text=text)), signature)


def web3_erc1271(rpc_url: str, timeout: float = 10.0) -> Erc1271Fn:
    """ERC-1271 through a JSON-RPC node: `isValidSignature(hash, sig) == 0x1626ba7e`."""
    from web3 import AsyncHTTPProvider, AsyncWeb3

    w3 = AsyncWeb3(AsyncHTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))
    abi = [
        {
            "name": "isValidSignature",
            "type": "function",
            "stateMutability": "view",
            "inputs": [{"name": "hash", "type": "bytes32"}, {"name": "signature", "type": "bytes"}],
            "outputs": [{"name": "magicValue", "type": "bytes4"}],
        }
    ]

    async def check(address: str, message_hash: bytes, signature: bytes) -> bool:
        try:
            if not await w3.eth.get_code(to_checksum_address(address)):
                return False
            contract = w3.eth.contract(address=to_checksum_address(address), abi=abi)
            result = await contract.functions.isValidSignature(message_hash, signature).call()
        except Exception:
            return False
        return bytes(result) == ERC1271_MAGIC

    return check
