"""The ABIs the relay ships (`quotra/chain/abi`) are the contracts': the escrow's exactly as
compiled, and USDC's (Circle's FiatToken v2.2 shape) implemented alike by the twin's MockUSDC for
every function and event the relay uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eth_utils import event_abi_to_log_topic, function_abi_to_4byte_selector
from quotra.chain.client import abi

BUILD = Path(__file__).resolve().parents[2] / ".build" / "__local__.json"


def compiled(name: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(BUILD.read_text())["contractTypes"][name]["abi"]
    return entries


def shape(entry: dict[str, Any]) -> tuple[Any, ...]:
    """What the wire sees of an ABI entry: its selector or topic, and its types."""
    if entry["type"] == "event":
        return ("event", event_abi_to_log_topic(entry), tuple(i.get("indexed") for i in entry["inputs"]))
    outputs = tuple(o["type"] for o in entry.get("outputs", []))
    return ("function", function_abi_to_4byte_selector(entry), outputs)


def test_escrow_abi__is_the_compiled_one() -> None:
    # After a change to QuotraEscrow.vy: `make compile`, then `python tools/export_abis.py`.
    assert abi("QuotraEscrow") == compiled("QuotraEscrow")


def test_usdc_abi__mock_usdc_implements_what_the_relay_uses() -> None:
    mock = {shape(e) for e in compiled("MockUSDC") if e["type"] in ("function", "event")}
    ours = [e for e in abi("FiatToken") if e["type"] in ("function", "event")]
    # FiatToken v2.2's `bytes signature` overloads (for ERC-1271 payers) are not on the twin.
    missing = [
        e["name"] for e in ours if shape(e) not in mock and not any(i["type"] == "bytes" for i in e["inputs"])
    ]
    assert missing == []
    assert {e["name"] for e in ours} >= {
        "balanceOf", "allowance", "approve", "authorizationState", "DOMAIN_SEPARATOR", "name", "version",
        "transferWithAuthorization", "receiveWithAuthorization", "AuthorizationUsed", "Transfer",
    }  # fmt: skip
