"""Bounds on what clients send, declared once: the parser of every JSON a client sends (request
bodies, x402 payment headers, relayer webhooks) and the types of the API's strings and numbers.

Whatever falls outside is a 4xx before anything is stored or sent on:
- JSON no deeper than `MAX_JSON_DEPTH`, without NaN or infinities, its integers within uint256;
- strings of bounded length without control characters (C0, DEL, C1): PostgreSQL refuses NUL,
  and no name, model, key or URL has a use for the others;
- integers that fit the database's BIGINT columns: token counts are bounded so that a call's
  maximum cost (price per call + tokens times price per token) always does, and so are page positions.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

T = TypeVar("T")

INT64_MAX: Final = 2**63 - 1
UINT256_MAX: Final = 2**256 - 1
MAX_JSON_DEPTH: Final = 64
# The most output (or input) tokens one call may name: with the dearest token price (1,000 USDC
# per million tokens) a call's cost stays below 10**11 atomic units, far within BIGINT.
MAX_TOKENS: Final = 10_000_000
MAX_OFFSET: Final = 100_000

# ---- JSON ----------------------------------------------------------------------------------------

_STRINGS: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_STEP: Final = tuple(1 if b in b"[{" else -1 for b in range(256))
_UINT256_DIGITS: Final = len(str(UINT256_MAX))


def json_depth(data: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings do not count)."""
    brackets = _STRINGS.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > _UINT256_DIGITS:
        raise ValueError("an integer has more digits than a uint256")
    return int(text)


def loads(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A client's JSON, within bounds; `json.JSONDecodeError` (a ValueError) otherwise."""
    # Only a text with more openers than the bound can nest deeper: most never need the scan.
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth(raw) > max_depth:
        raise json.JSONDecodeError(f"nested deeper than {max_depth} levels", "", 0)
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite, parse_int=_integer)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # not UTF-8, or a number out of bounds
        raise json.JSONDecodeError(str(exc), "", 0) from exc


# ---- strings -------------------------------------------------------------------------------------

_CONTROL: Final = r"\x00-\x1f\x7f-\x9f"
PRINTABLE: Final = rf"^[^{_CONTROL}]*$"
_PRINTABLE: Final = re.compile(PRINTABLE)


def printable(text: object, max_length: int) -> bool:
    """Whether `text` is a string of at most `max_length` characters, none a control character."""
    return isinstance(text, str) and len(text) <= max_length and _PRINTABLE.fullmatch(text) is not None


def _not_a_listing_name(name: str) -> str:
    # "listing/…" is how a call names one listing, so no model may be called that.
    if name.startswith("listing/"):
        raise ValueError("model names may not start with 'listing/'")
    return name


Name = Annotated[str, Field(max_length=100, pattern=PRINTABLE)]
# An upstream's API key: a token, without whitespace.
Secret = Annotated[str, Field(min_length=1, max_length=4096, pattern=rf"^[^\s{_CONTROL}]+$")]
UrlText = Annotated[str, Field(min_length=1, max_length=2048, pattern=PRINTABLE)]
# A model a listing serves: no whitespace, not starting with "/".
ModelName = Annotated[
    str,
    Field(min_length=1, max_length=200, pattern=rf"^[^\s/{_CONTROL}][^\s{_CONTROL}]*$"),
    AfterValidator(_not_a_listing_name),
]
# What a call asks for: a model, or `listing/<id>[/<model>]`.
ModelRef = Annotated[str, Field(min_length=1, max_length=300, pattern=PRINTABLE)]
Address = Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{40}$")]


def _present(value: Any) -> Any:
    if value is None:
        raise ValueError("may be left out, but not null")
    return value


# A field of a change (PATCH) that may be left out (None) but never set to null: validated as `T`
# alone, so its errors name the field, not a member of a union with None.
if TYPE_CHECKING:
    Omittable = Annotated[T | None, BeforeValidator(_present)]
else:
    Omittable = Annotated[T, BeforeValidator(_present)]


# ---- numbers -------------------------------------------------------------------------------------


_UINT256_TEXT: Final = r"^(0x[0-9a-fA-F]{1,64}|[0-9]{1,78})$"


def _uint256(value: Any) -> int:
    if isinstance(value, str):
        if not re.fullmatch(_UINT256_TEXT, value):
            raise ValueError("must be an unsigned 256-bit integer, decimal or 0x-hex")
        value = int(value, 16) if value.startswith("0x") else int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT256_MAX:
        raise ValueError("must be an unsigned 256-bit integer")
    return value


# An EIP-712 uint256: an integer, or its decimal or 0x-hex string (safe for JavaScript).
Uint256 = Annotated[
    int,
    BeforeValidator(_uint256),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": UINT256_MAX},
                {"type": "string", "pattern": _UINT256_TEXT},
            ]
        }
    ),
]
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
Offset = Annotated[int, Field(ge=0, le=MAX_OFFSET, description="How many items to skip")]
PageSize = Annotated[int, Field(ge=1, le=200)]
