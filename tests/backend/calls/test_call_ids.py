"""Call ids are ULIDs: `call_` + 26 Crockford base32 digits, 48 bits of milliseconds first."""

from __future__ import annotations

import re
from unittest import mock

from quotra.calls.records import CALL_ID_PATTERN, new_call_id


def with_random(value: int, ms: int) -> str:
    with mock.patch("quotra.calls.records.os.urandom", return_value=value.to_bytes(10, "big")):
        return new_call_id(ms)


def test_the_ulid_specs_timestamp_and_the_extremes() -> None:
    assert with_random(0, 1469918176385).startswith("call_01ARYZ6S41")  # the ULID spec's example
    assert with_random(0, 0) == "call_" + "0" * 26
    assert with_random(2**80 - 1, 2**48 - 1) == "call_7" + "Z" * 25
    assert with_random(31, 0) == "call_" + "0" * 25 + "Z"


def test_ids_sort_by_time_and_match_the_pattern() -> None:
    ids = [new_call_id(ms) for ms in (1, 2, 10**12, 2**47)]
    assert ids == sorted(ids)
    assert all(re.fullmatch(CALL_ID_PATTERN, i) for i in [*ids, new_call_id()])
