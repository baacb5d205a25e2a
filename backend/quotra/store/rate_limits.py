"""Rate limits every replica shares, kept in the database (`rate_limits`, one row per limited key).

The generic cell rate algorithm: a key limited to `n` requests a minute admits one every
`60 s / n`, in bursts of up to `n`; its row holds the theoretical arrival time (`tat`, in
microseconds) of the next request. Taking a request is one conditional UPDATE (or the row's first
INSERT) inside the caller's own transaction, so replicas never admit more than the limit together
and a refused request writes nothing.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any, Final

from sqlalchemy import BigInteger, bindparam, case, select, update
from sqlalchemy.engine import Connection

from quotra.ratelimit import Decision
from quotra.store.models import RateLimit, table
from quotra.store.sql import insert_ignore

WINDOW_US: Final = 60_000_000
LIMITS: Final = table(RateLimit)

_NOW: Final = bindparam("b_now", type_=BigInteger())
_INTERVAL: Final = bindparam("b_interval", type_=BigInteger())
_NEXT = case((LIMITS.c.tat > _NOW, LIMITS.c.tat), else_=_NOW) + _INTERVAL
_TAKE: Final = (
    update(LIMITS)
    .where(LIMITS.c.key == bindparam("b_key"), _NEXT - _NOW <= WINDOW_US)
    .values(tat=_NEXT)
    .returning(LIMITS.c.tat)
)
_TAT: Final = select(LIMITS.c.tat).where(LIMITS.c.key == bindparam("b_key"))


@cache
def _insert(dialect: str) -> Any:
    return insert_ignore(dialect, LIMITS)


def take(connection: Connection, key: str, per_minute: int, now_us: int) -> Decision:
    """Admits one request of `key` (limited to `per_minute`) at `now_us` (microseconds since the
    epoch), or refuses it: the decision with its `RateLimit-*` figures."""
    interval = max(1, WINDOW_US // per_minute)
    params = {"b_key": key, "b_now": now_us, "b_interval": interval}
    tat = connection.execute(_TAKE, params).scalar_one_or_none()
    if tat is None:
        inserted = connection.execute(
            _insert(connection.dialect.name), {"key": key, "tat": now_us + interval}
        )
        if int(getattr(inserted, "rowcount", 0)) == 1:
            tat = now_us + interval
        else:  # another replica inserted it first: try once more against its row
            tat = connection.execute(_TAKE, params).scalar_one_or_none()
    if tat is not None:
        remaining = (WINDOW_US - (int(tat) - now_us)) // interval
        return Decision(True, per_minute, remaining, math.ceil((int(tat) - now_us) / 1_000_000), 0)
    held = int(connection.execute(_TAT, {"b_key": key}).scalar_one())
    retry = max(1, math.ceil((held + interval - WINDOW_US - now_us) / 1_000_000))
    return Decision(False, per_minute, 0, math.ceil((held - now_us) / 1_000_000), retry)
