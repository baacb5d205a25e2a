"""In-process token buckets (one relay replica) with IETF `RateLimit` header values.

Several replicas would each enforce the limit on their own share of traffic; a shared
limiter (Redis, the database) can implement the same `hit` signature later.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from quotra.errors import RateLimited


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int
    retry_after: int

    def headers(self, window: int = 60) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
            "RateLimit-Policy": f"{self.limit};w={window}",
            "RateLimit": f"limit={self.limit}, remaining={self.remaining}, reset={self.reset_seconds}",
        }

    def refusal(self, what: str) -> RateLimited:
        """The 429 of a refused request (`what`: whose limit), with its headers and `Retry-After`."""
        headers = self.headers()
        headers["Retry-After"] = str(self.retry_after)
        return RateLimited(
            f"Rate limit reached for {what}: {self.limit} requests per minute. "
            f"Retry after {self.retry_after} s.",
            headers=headers,
        )


class TokenBucketLimiter:
    """`per_minute` requests per minute, bursts up to the same amount; bounded memory (LRU)."""

    def __init__(self, max_keys: int = 100_000, clock: object = time.monotonic) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max_keys = max_keys
        self._clock = clock

    def hit(self, key: str, per_minute: int) -> Decision:
        now: float = self._clock()  # type: ignore[operator]
        rate = per_minute / 60.0
        tokens, stamp = self._buckets.get(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - stamp) * rate)
        if tokens >= 1.0:
            tokens -= 1.0
            allowed = True
            retry = 0
        else:
            allowed = False
            retry = max(1, math.ceil((1.0 - tokens) / rate))
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        reset = math.ceil((per_minute - tokens) / rate) if tokens < per_minute else 0
        return Decision(allowed, per_minute, int(tokens), reset, retry)

    def check(self, key: str, per_minute: int, what: str) -> Decision:
        decision = self.hit(key, per_minute)
        if not decision.allowed:
            raise decision.refusal(what)
        return decision
