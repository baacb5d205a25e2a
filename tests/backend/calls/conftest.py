"""The call core's tests use the x402 helpers of the payment tests (a fake chain, signed headers)."""

from __future__ import annotations

import sys
from pathlib import Path

PAYMENTS_TESTS = Path(__file__).resolve().parents[1] / "payments"
if str(PAYMENTS_TESTS) not in sys.path:
    sys.path.insert(0, str(PAYMENTS_TESTS))
