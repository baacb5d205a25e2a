"""Rate limits every replica shares, kept in the database.

The generic cell rate algorithm: a key limited to `n` requests a minute admits one every
`60 s / n`, in bursts of up to `n`; its row holds the theoretical arrival time (`tat`, in
microseconds) of the next request. Taking a request is one conditional UPDATE inside the caller's
own transaction, so replicas never admit more than the limit together and a refused request
writes nothing. An API key's limit lives on its own row (`api_keys.rate_tat`, moved by the call's
reservation itself, `quotra.calls.store`); other limits (sign-in) have a row in `rate_limits`.
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


def interval_of(per_minute: int | None) -> int:
    """Microseconds between two admitted requests (0: no limit)."""
    return 0 if per_minute is None else max(1, WINDOW_US // per_minute)


def decision(per_minute: int, interval: int, tat: int, now_us: int, allowed: bool) -> Decision:
    """The `RateLimit-*` figures of a request admitted (`tat` after it) or refused (`tat` as it was)."""
    if allowed:
        remaining = (WINDOW_US - (tat - now_us)) // interval
        return Decision(True, per_minute, remaining, math.ceil((tat - now_us) / 1_000_000), 0)
    retry = max(1, math.ceil((tat + interval - WINDOW_US - now_us) / 1_000_000))
    return Decision(False, per_minute, 0, math.ceil((tat - now_us) / 1_000_000), retry)


def refuses(per_minute: int | None, tat: int, now_us: int) -> bool:
    """Whether a limit whose row holds `tat` refuses a request at `now_us`."""
    return per_minute is not None and max(tat, now_us) + interval_of(per_minute) - now_us > WINDOW_US


def take(connection: Connection, key: str, per_minute: int, now_us: int) -> Decision:
    """Admits one request of `key` (limited to `per_minute`) at `now_us` (microseconds since the
    epoch), or refuses it: the decision with its `RateLimit-*` figures."""
    interval = interval_of(per_minute)
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
        return decision(per_minute, interval, int(tat), now_us, allowed=True)
    held = int(connection.execute(_TAT, {"b_key": key}).scalar_one())
    return decision(per_minute, interval, held, now_us, allowed=False)
