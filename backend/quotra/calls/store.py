"""The call store: reserve a call, finish or void it, sweep what never finished.

Reserving is one transaction that takes, all or nothing, one call of the listing's quota, the
gate's budget (a free call: of the listing's daily budget and of the consumer's allowance; the
prepaid account and key; the x402 payer's balance and nonce) and writes the call's row.
Finishing (capture with usage and outcome) and voiding are one transaction each, and each is a
conditional UPDATE of the row (`WHERE state = 'reserved'`), so a call ends exactly once whoever
races for it (the relay, the sweeper, another replica).

Every operation is a synchronous function of a connection, run by
`quotra.store.transactions.Transactions`: on SQLite by the one writer thread (with group commit),
on PostgreSQL as its own transaction. Lock order, to rule out deadlocks between replicas:
listing, then the budget rows (account, a connected permission, key or payer, then an app's end
user), then the call.

An app key's call costs its base price plus the app's markup (`quotra.money.markup_of`), under a
permission that allows that markup to the app's developer. It is charged to the developer's
deposit; a call for a hosted end user (`X-Quotra-User`) also reserves within what the user may
still spend (grants left plus the spend limit left), and its finish spends the user's grants
first. An end user who connected its wallet pays from its own deposit instead, under the
permission it signed for that app (each connection's permission has its own budget, so one wallet
may pay for several apps at once), the markup still the developer's.

The statements of the call path are built once, with bind parameters (`:b_…`), so SQLAlchemy
compiles each once and every call only binds values: building and compiling a statement per call
cost about eight times what executing it does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, Final

from sqlalchemy import BigInteger, and_, bindparam, case, exists, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from quotra.calls.records import PAID_GATES, CallView, Refused, X402Hold, new_call_id
from quotra.ratelimit import Decision
from quotra.store.direct import prepared
from quotra.store.models import (
    ApiKeyRecord,
    AppUser,
    Call,
    ConsumerAccount,
    Listing,
    PlaygroundUsage,
    SpendPermissionRecord,
    X402Authorization,
    X402Payer,
    new_app_user,
    table,
    utc_day,
    utcnow,
)
from quotra.store.rate_limits import WINDOW_US, decision, interval_of, refuses
from quotra.store.sql import insert_ignore
from quotra.store.transactions import Transactions

CALLS: Final = table(Call)
AUTHS: Final = table(X402Authorization)
PAYERS: Final = table(X402Payer)
LISTINGS: Final = table(Listing)
ACCOUNTS: Final = table(ConsumerAccount)
KEYS: Final = table(ApiKeyRecord)
PLAYGROUND: Final = table(PlaygroundUsage)
USERS: Final = table(AppUser)
SWEEP_BATCH: Final = 200


@dataclass(frozen=True)
class Hold:
    """What a gate asks to reserve for one call."""

    payer: str  # the wallet paying (x402 payer, prepaid wallet) or the free caller's id
    listing_id: str
    provider: str
    amount: int  # the call's maximum cost, reserved (an app's markup included)
    expires_at: datetime  # voided by the sweeper if not finished by then
    app_id: str | None = None  # an app key's call: its app…
    markup_bps: int = 0  # …whose markup the payer's permission must allow…
    end_user: str | None = None  # …and the end user it serves, if any
    rate_per_minute: int | None = None  # an API key's call: the key's limit, shared by the replicas


@dataclass(frozen=True)
class Served:
    """What a finished call served."""

    model: str
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    duration_ms: int
    outcome: str = "ok"  # or "cancelled": the client hung up mid-stream


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


def _param(name: str) -> Any:
    """An integer bind parameter (amounts, timestamps) that SQL may compare and add."""
    return bindparam(name, type_=BigInteger)


_TAKE_LISTING_CALL: Final = prepared(
    update(LISTINGS)
    .where(
        LISTINGS.c.id == bindparam("b_listing"),
        LISTINGS.c.status == "active",
        or_(LISTINGS.c.expires_at.is_(None), LISTINGS.c.expires_at > bindparam("b_now")),
        or_(LISTINGS.c.max_calls.is_(None), LISTINGS.c.calls_used < LISTINGS.c.max_calls),
    )
    .values(calls_used=LISTINGS.c.calls_used + 1)
)
_INSERT_CALL: Final = prepared(insert(CALLS))


def _take_listing_call(connection: Connection, listing_id: str, now: datetime) -> None:
    taken = connection.execute(_TAKE_LISTING_CALL, {"b_listing": listing_id, "b_now": now})
    if _rowcount(taken) != 1:
        raise Refused("listing_unavailable")


def _insert_call(
    connection: Connection,
    call_id: str,
    gate: str,
    hold: Hold,
    now: datetime,
    *,
    key_id: str | None = None,
    permission_digest: str | None = None,
) -> None:
    connection.execute(
        _INSERT_CALL,
        {
            "id": call_id,
            "gate": gate,
            "state": "reserved",
            "listing_id": hold.listing_id,
            "provider": hold.provider,
            "payer": hold.payer,
            "key_id": key_id,
            "permission_digest": permission_digest,
            "app_id": hold.app_id,
            "end_user": hold.end_user,
            "model": "",
            "stream": False,
            "reserved": hold.amount,
            "amount": 0,
            "markup": 0,
            "granted": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "expires_at": hold.expires_at,
            "created_at": now,
            "updated_at": now,
        },
    )


# ---- reserving ----------------------------------------------------------------------------------


def _reserve_open(connection: Connection, call_id: str, hold: Hold, gate: str, now: datetime) -> None:
    """A call no budget pays for (a static sandbox key): only the listing's quota."""
    _take_listing_call(connection, hold.listing_id, now)
    _insert_call(connection, call_id, gate, hold, now)


# The listing's free calls today, shared by all consumers: on a new UTC day the count starts again.
_DAILY_FREE_CALLS: Final = func.coalesce(LISTINGS.c.free_calls_per_day, _param("b_default"))
_TAKE_DAILY_FREE_CALL: Final = prepared(
    update(LISTINGS)
    .where(
        LISTINGS.c.id == bindparam("b_listing"),
        _DAILY_FREE_CALLS > 0,
        or_(LISTINGS.c.free_calls_day != _param("b_day"), LISTINGS.c.free_calls_today < _DAILY_FREE_CALLS),
    )
    .values(
        free_calls_today=case(
            (LISTINGS.c.free_calls_day == _param("b_day"), LISTINGS.c.free_calls_today + 1), else_=1
        ),
        free_calls_day=_param("b_day"),
    )
)
_GIVE_BACK_DAILY_FREE_CALL: Final = prepared(
    update(LISTINGS)
    .where(
        LISTINGS.c.id == bindparam("b_listing"),
        LISTINGS.c.free_calls_day == _param("b_day"),
        LISTINGS.c.free_calls_today > 0,
    )
    .values(free_calls_today=LISTINGS.c.free_calls_today - 1)
)
_TAKE_FREE_CALL: Final = prepared(
    update(PLAYGROUND)
    .where(
        PLAYGROUND.c.listing_id == bindparam("b_listing"),
        PLAYGROUND.c.consumer == bindparam("b_consumer"),
        PLAYGROUND.c.calls < _param("b_limit"),
    )
    .values(calls=PLAYGROUND.c.calls + 1)
)


@cache
def _insert_playground(dialect: str) -> Any:
    return prepared(insert_ignore(dialect, PLAYGROUND))


def _reserve_playground(
    connection: Connection, call_id: str, hold: Hold, limit: int, daily_default: int, now: datetime
) -> None:
    """A free call: one of the listing's free calls today (`daily_default` unless the listing sets
    its own) and one of the consumer's `limit` on the listing."""
    _take_listing_call(connection, hold.listing_id, now)
    day = {"b_listing": hold.listing_id, "b_day": utc_day(now), "b_default": daily_default}
    if _rowcount(connection.execute(_TAKE_DAILY_FREE_CALL, day)) != 1:
        raise Refused("daily_free_calls_used")
    connection.execute(
        _insert_playground(connection.dialect.name),
        {"listing_id": hold.listing_id, "consumer": hold.payer, "calls": 0},
    )
    taken = connection.execute(
        _TAKE_FREE_CALL, {"b_listing": hold.listing_id, "b_consumer": hold.payer, "b_limit": limit}
    )
    if _rowcount(taken) != 1:
        raise Refused("free_calls_used")
    _insert_call(connection, call_id, "playground", hold, now)


_PERMISSION: Final = table(SpendPermissionRecord)
# A permission usable now: not revoked, valid, and not expiring within the margin.
_PERMISSION_USABLE: Final = and_(
    _PERMISSION.c.revoked_at.is_(None),
    _PERMISSION.c.valid_after <= _param("b_now_ts"),
    _PERMISSION.c.valid_until > _param("b_valid_until"),
)
# What the wallet's deposit covers beside its pending withdrawal, unsettled and reserved calls.
_DEPOSIT_COVERS: Final = (
    ACCOUNTS.c.deposit - ACCOUNTS.c.pending_withdrawal - ACCOUNTS.c.unsettled - ACCOUNTS.c.reserved
    >= _param("b_amount")
)


def _reserve_in(budget: Any, *where: Any, returning: Any = None) -> Any:
    """A budget row (an account, a connected permission) reserves a call's amount where it may
    (run directly)."""
    statement = update(budget).where(*where).values(reserved=budget.c.reserved + _param("b_amount"))
    return prepared(statement if returning is None else statement.returning(returning))


# The wallet's own calls: its deposit and its active permission.
_RESERVE_ACCOUNT: Final = _reserve_in(
    ACCOUNTS,
    ACCOUNTS.c.wallet == bindparam("b_wallet"),
    ACCOUNTS.c.permission_digest.is_not(None),
    exists().where(
        _PERMISSION.c.digest == ACCOUNTS.c.permission_digest,
        _PERMISSION_USABLE,
        # An app's markup goes to the app's developer: the permission must name it and allow
        # that much, or the escrow would refuse the batch.
        or_(
            _param("b_markup_bps") == 0,
            and_(
                _PERMISSION.c.developer == bindparam("b_developer"),
                _PERMISSION.c.max_markup_bps >= _param("b_markup_bps"),
            ),
        ),
    ),
    _DEPOSIT_COVERS,
    ACCOUNTS.c.permission_allowance - ACCOUNTS.c.permission_spent - ACCOUNTS.c.unsettled - ACCOUNTS.c.reserved
    >= _param("b_amount"),
    returning=ACCOUNTS.c.permission_digest,
)
# A connected end user's call: the wallet's deposit, and the budget of the permission it signed
# for the app (which names the app's developer and allows its markup).
_RESERVE_DEPOSIT: Final = _reserve_in(ACCOUNTS, ACCOUNTS.c.wallet == bindparam("b_wallet"), _DEPOSIT_COVERS)
_RESERVE_CONNECTED: Final = _reserve_in(
    _PERMISSION,
    _PERMISSION.c.digest == bindparam("b_digest"),
    _PERMISSION.c.consumer == bindparam("b_wallet"),
    _PERMISSION_USABLE,
    _PERMISSION.c.developer == bindparam("b_developer"),
    _PERMISSION.c.max_markup_bps >= _param("b_markup_bps"),
    _PERMISSION.c.allowance - _PERMISSION.c.spent - _PERMISSION.c.unsettled - _PERMISSION.c.reserved
    >= _param("b_amount"),
)
# The key's rate limit moves in the same statement (`quotra.store.rate_limits`: `rate_tat` is the
# theoretical arrival time of its next request; an interval of 0 is no limit).
_NOW_US: Final = _param("b_now_us")
_KEY_NEXT: Final = case((KEYS.c.rate_tat > _NOW_US, KEYS.c.rate_tat), else_=_NOW_US) + _param("b_interval")
_RESERVE_KEY: Final = prepared(
    update(KEYS)
    .where(
        KEYS.c.id == bindparam("b_key"),
        KEYS.c.revoked_at.is_(None),
        or_(
            KEYS.c.spend_cap.is_(None),
            KEYS.c.spend_cap - KEYS.c.spent - KEYS.c.reserved >= _param("b_amount"),
        ),
        _KEY_NEXT - _NOW_US <= WINDOW_US,
    )
    .values(
        reserved=KEYS.c.reserved + _param("b_amount"), last_used_at=bindparam("b_now"), rate_tat=_KEY_NEXT
    )
    .returning(KEYS.c.rate_tat)
)
_KEY_STATE: Final = prepared(
    select(KEYS.c.revoked_at, KEYS.c.rate_tat).where(KEYS.c.id == bindparam("b_key"))
)


@cache
def _insert_user(dialect: str) -> Any:
    return prepared(insert_ignore(dialect, USERS))


_USER: Final = and_(USERS.c.app_id == bindparam("b_app"), USERS.c.external_id == bindparam("b_user"))
# What an end user may still spend: its grants left, plus its spend limit left (if it has one).
_USER_WALLET: Final = prepared(select(USERS.c.wallet, USERS.c.permission_digest).where(_USER))
_KEY_OWNER: Final = prepared(select(KEYS.c.wallet).where(KEYS.c.id == bindparam("b_key")))
_RESERVE_USER: Final = prepared(
    update(USERS)
    .where(
        _USER,
        or_(
            USERS.c.spend_limit.is_(None),
            USERS.c.spend_limit - USERS.c.spent + USERS.c.granted - USERS.c.grant_used - USERS.c.reserved
            >= _param("b_amount"),
        ),
    )
    .values(reserved=USERS.c.reserved + _param("b_amount"))
)


def _reserve_user(connection: Connection, hold: Hold, now: datetime) -> None:
    """An end user's call: within what the user may still spend (created on its first call)."""
    assert hold.app_id is not None and hold.end_user is not None
    connection.execute(_insert_user(connection.dialect.name), new_app_user(hold.app_id, hold.end_user, now))
    taken = connection.execute(
        _RESERVE_USER, {"b_app": hold.app_id, "b_user": hold.end_user, "b_amount": hold.amount}
    )
    if _rowcount(taken) != 1:
        raise Refused("user_limit")


def _reserve_key(
    connection: Connection,
    call_id: str,
    hold: Hold,
    key_id: str,
    live: bool,
    now_ts: int,
    margin: int,
    now: datetime,
) -> Decision | None:
    """A prepaid call (live key: the listing's quota, the account's deposit and permission, the
    key's cap, and an app's end user's limit) or a sandbox one (the key's cap only, never settled;
    answered by the relay's sandbox, so it takes nothing of the listing's quota), within the key's
    rate limit (`Refused("rate_limited")` otherwise). Returns the rate limit's decision."""
    digest = None
    developer = hold.payer  # the key's owner
    if live:
        _take_listing_call(connection, hold.listing_id, now)
        connected = None
        if hold.end_user is not None:  # an end user who connected its wallet pays itself
            connected = connection.execute(
                _USER_WALLET, {"b_app": hold.app_id, "b_user": hold.end_user}
            ).first()
        terms = {
            "b_developer": developer,
            "b_now_ts": now_ts,
            "b_valid_until": now_ts + margin,
            "b_amount": hold.amount,
            "b_markup_bps": hold.markup_bps,
        }
        if connected is not None and connected.wallet is not None:
            hold = dataclasses.replace(hold, payer=connected.wallet)
            digest = connected.permission_digest
            wallet = {"b_wallet": hold.payer, "b_amount": hold.amount}
            if (
                _rowcount(connection.execute(_RESERVE_DEPOSIT, wallet)) != 1
                or _rowcount(connection.execute(_RESERVE_CONNECTED, {**terms, **wallet, "b_digest": digest}))
                != 1
            ):
                raise Refused("deposit")  # told apart by `PrepaidService`
        else:
            digest = connection.execute(
                _RESERVE_ACCOUNT, {**terms, "b_wallet": hold.payer}
            ).scalar_one_or_none()
            if digest is None:
                raise Refused("deposit")  # which limit exactly is told by `PrepaidService`
    now_us, per_minute = int(now.timestamp() * 1_000_000), hold.rate_per_minute
    interval = interval_of(per_minute)
    tat = connection.execute(
        _RESERVE_KEY,
        {"b_key": key_id, "b_amount": hold.amount, "b_now": now, "b_now_us": now_us, "b_interval": interval},
    ).scalar_one_or_none()
    if tat is None:
        state = connection.execute(_KEY_STATE, {"b_key": key_id}).first()
        if state is not None and state.revoked_at is None and refuses(per_minute, state.rate_tat, now_us):
            assert per_minute is not None
            raise Refused("rate_limited", rate=decision(per_minute, interval, state.rate_tat, now_us, False))
        raise Refused("key_cap")  # or revoked: told apart by `PrepaidService`
    rate = None if per_minute is None else decision(per_minute, interval, int(tat), now_us, True)
    if live and hold.end_user is not None and hold.payer == developer:  # a hosted user
        _reserve_user(connection, hold, now)
    gate = "prepaid" if live else "sandbox"
    _insert_call(connection, call_id, gate, hold, now, key_id=key_id, permission_digest=digest)
    return rate


_NEWER_SNAPSHOT: Final = _param("b_block") > PAYERS.c.block
_TAKE_SNAPSHOT: Final = prepared(
    update(PAYERS)
    .where(PAYERS.c.payer == bindparam("b_payer"))
    .values(
        balance=case((_NEWER_SNAPSHOT, _param("b_balance")), else_=PAYERS.c.balance),
        block=case((_NEWER_SNAPSHOT, _param("b_block")), else_=PAYERS.c.block),
        updated_at=bindparam("b_now"),
    )
    .returning(PAYERS.c.balance, PAYERS.c.block, PAYERS.c.unpaid)
)
# An authorization the snapshot's block covers: settled in or before it, so already out of the
# balance it holds.
_COVERED: Final = and_(AUTHS.c.settled_block.is_not(None), AUTHS.c.settled_block <= _param("b_block"))
_UNSETTLED: Final = prepared(
    select(
        func.coalesce(func.sum(case((_COVERED, 0), else_=AUTHS.c.value)), 0),
        func.count(case((_COVERED, 1))),
    ).where(AUTHS.c.payer == bindparam("b_payer"), AUTHS.c.pending)
)
_UNPEND_COVERED: Final = prepared(
    update(AUTHS)
    .where(AUTHS.c.payer == bindparam("b_payer"), AUTHS.c.pending, _COVERED)
    .values(pending=False)
)
_INSERT_AUTHORIZATION: Final = prepared(insert(AUTHS))


@cache
def _insert_payer(dialect: str) -> Any:
    return prepared(insert_ignore(dialect, PAYERS))


def _payer_snapshot(connection: Connection, auth: X402Hold, now: datetime) -> tuple[int, int]:
    """The payer's newest balance snapshot (this one if it is newer), its row locked. Refuses a
    payer with an authorization that did not pay."""
    connection.execute(
        _insert_payer(connection.dialect.name),
        {"payer": auth.payer, "balance": auth.balance, "block": auth.block, "unpaid": 0, "updated_at": now},
    )
    balance, block, unpaid = connection.execute(
        _TAKE_SNAPSHOT,
        {"b_payer": auth.payer, "b_balance": auth.balance, "b_block": auth.block, "b_now": now},
    ).one()
    if unpaid:
        raise Refused("payer_unpaid")
    return int(balance), int(block)


def _unsettled(connection: Connection, payer: str, block: int) -> int:
    """What the payer's authorizations not settled by `block` hold; the ones settled by then stop
    being pending."""
    unsettled, covered = connection.execute(_UNSETTLED, {"b_payer": payer, "b_block": block}).one()
    if covered:
        connection.execute(_UNPEND_COVERED, {"b_payer": payer, "b_block": block})
    return int(unsettled)


def _reserve_x402(connection: Connection, call_id: str, hold: Hold, auth: X402Hold, now: datetime) -> None:
    """An x402 call: the authorization's (payer, nonce) once, and its value within what the payer
    can still pay: its balance as of the snapshot's block minus every authorization not settled
    in or before that block."""
    _take_listing_call(connection, hold.listing_id, now)
    balance, block = _payer_snapshot(connection, auth, now)
    if balance - _unsettled(connection, auth.payer, block) < auth.value:
        raise Refused("insufficient_balance")
    _insert_call(connection, call_id, "x402", hold, now)
    connection.execute(
        _INSERT_AUTHORIZATION,
        {
            "call_id": call_id,
            "payer": auth.payer,
            "nonce": auth.nonce,
            "value": auth.value,
            "valid_after": auth.valid_after,
            "valid_before": auth.valid_before,
            "signature": auth.signature,
            "request_hash": auth.request_hash,
            "pending": True,
            "settled_block": None,
        },
    )


def _rereserve_x402(
    connection: Connection, call_id: str, hold: Hold, auth: X402Hold, voided: str, now: datetime
) -> None:
    """An authorization whose earlier call was voided (nothing charged) pays for a new call."""
    released = connection.execute(
        update(AUTHS)
        .where(
            AUTHS.c.payer == auth.payer,
            AUTHS.c.nonce == auth.nonce,
            AUTHS.c.call_id == voided,
            exists().where(CALLS.c.id == voided, CALLS.c.state == "voided"),
        )
        .values(pending=False)
    )
    if _rowcount(released) != 1:
        raise Refused("nonce_used")
    _take_listing_call(connection, hold.listing_id, now)
    balance, block = _payer_snapshot(connection, auth, now)
    if balance - _unsettled(connection, auth.payer, block) < auth.value:
        raise Refused("insufficient_balance")
    _insert_call(connection, call_id, "x402", hold, now)
    connection.execute(
        update(AUTHS)
        .where(AUTHS.c.payer == auth.payer, AUTHS.c.nonce == auth.nonce)
        .values(call_id=call_id, request_hash=auth.request_hash, pending=True, settled_block=None)
    )


# ---- finishing ----------------------------------------------------------------------------------

_RETURNED: Final = (
    CALLS.c.gate,
    CALLS.c.payer,
    CALLS.c.key_id,
    CALLS.c.reserved,
    CALLS.c.listing_id,
    CALLS.c.app_id,
    CALLS.c.end_user,
    CALLS.c.permission_digest,
)
_FINISH: Final = prepared(
    update(CALLS)
    .where(CALLS.c.id == bindparam("b_call"), CALLS.c.state == "reserved")
    .values(
        # A paid call that costs something is captured; anything else owes nothing: settled.
        state=case(
            (and_(or_(*(CALLS.c.gate == gate for gate in PAID_GATES)), _param("b_amount") > 0), "captured"),
            else_="settled",
        ),
        # At most what was reserved; a free call is never charged.
        amount=case(
            (CALLS.c.gate == "playground", 0),
            (CALLS.c.reserved < _param("b_amount"), CALLS.c.reserved),
            else_=_param("b_amount"),
        ),
        # The markup is part of the amount; a charge cut to the reservation carries none.
        markup=case(
            (CALLS.c.gate == "playground", 0),
            (CALLS.c.reserved < _param("b_amount"), 0),
            else_=_param("b_markup"),
        ),
        model=bindparam("b_model"),
        stream=bindparam("b_stream"),
        prompt_tokens=bindparam("b_prompt_tokens"),
        completion_tokens=bindparam("b_completion_tokens"),
        outcome=bindparam("b_outcome"),
        duration_ms=bindparam("b_duration_ms"),
        updated_at=bindparam("b_now"),
    )
    .returning(*_RETURNED, CALLS.c.amount)
)


def _capture_into(budget: Any, where: Any) -> Any:
    """A budget row (an account, a connected permission) moves a call's reservation to unsettled."""
    return prepared(
        update(budget)
        .where(where)
        .values(
            reserved=budget.c.reserved - _param("b_reserved"),
            unsettled=budget.c.unsettled + _param("b_amount"),
        )
    )


_CHARGE_ACCOUNT: Final = _capture_into(ACCOUNTS, ACCOUNTS.c.wallet == bindparam("b_wallet"))
_CHARGE_KEY: Final = prepared(
    update(KEYS)
    .where(KEYS.c.id == bindparam("b_key"))
    .values(reserved=KEYS.c.reserved - _param("b_reserved"), spent=KEYS.c.spent + _param("b_amount"))
)
_GRANT_LEFT: Final = prepared(select(USERS.c.granted - USERS.c.grant_used).where(_USER).with_for_update())
_CHARGE_USER: Final = prepared(
    update(USERS)
    .where(_USER)
    .values(
        reserved=USERS.c.reserved - _param("b_reserved"),
        grant_used=USERS.c.grant_used + _param("b_granted"),
        spent=USERS.c.spent + _param("b_amount") - _param("b_granted"),
    )
)
_RECORD_GRANTED: Final = prepared(
    update(CALLS).where(CALLS.c.id == bindparam("b_call")).values(granted=_param("b_granted"))
)
_RELEASE_USER: Final = prepared(
    update(USERS).where(_USER).values(reserved=USERS.c.reserved - _param("b_reserved"))
)
_CONNECTED: Final = _PERMISSION.c.digest == bindparam("b_digest")
_CHARGE_CONNECTED: Final = _capture_into(_PERMISSION, _CONNECTED)
_RELEASE_CONNECTED: Final = prepared(
    update(_PERMISSION).where(_CONNECTED).values(reserved=_PERMISSION.c.reserved - _param("b_reserved"))
)


def _hosted(connection: Connection, key_id: str, payer: str) -> bool:
    """Whether an end user's call was billed to the developer (the key's owner) and so to the
    user's grants and spend limit; a user who connected its wallet paid it itself, within the
    budget of the permission it connected (a wallet never connects to its own app)."""
    return bool(connection.execute(_KEY_OWNER, {"b_key": key_id}).scalar() == payer)


def _charge_user(
    connection: Connection, call_id: str, app_id: str, user: str, reserved: int, charged: int
) -> None:
    """An end user's call is charged to its grants first, the rest to its own spending."""
    keys = {"b_app": app_id, "b_user": user}
    left = int(connection.execute(_GRANT_LEFT, keys).scalar_one())
    granted = min(charged, left)
    connection.execute(
        _CHARGE_USER, {**keys, "b_reserved": reserved, "b_amount": charged, "b_granted": granted}
    )
    if granted:
        connection.execute(_RECORD_GRANTED, {"b_call": call_id, "b_granted": granted})


# An x402 authorization that will not be settled (its call was voided, or cost nothing): it no
# longer counts against its payer's balance.
_RELEASE_AUTHORIZATION: Final = (
    update(AUTHS).where(AUTHS.c.call_id == bindparam("b_call")).values(pending=False)
)


def _finish(
    connection: Connection, call_id: str, amount: int, markup: int, usage: Served, now: datetime
) -> bool:
    """reserved → captured (a paid call that costs something) or settled (free: nothing owed),
    with the usage; the charge is at most what was reserved, and the budgets move from reserved to
    charged. False if the call was no longer reserved."""
    row = connection.execute(
        _FINISH,
        {
            "b_call": call_id,
            "b_amount": amount,
            "b_markup": markup,
            "b_model": usage.model[:200],
            "b_stream": usage.stream,
            "b_prompt_tokens": usage.prompt_tokens,
            "b_completion_tokens": usage.completion_tokens,
            "b_outcome": usage.outcome,
            "b_duration_ms": usage.duration_ms,
            "b_now": now,
        },
    ).first()
    if row is None:
        return False
    gate, payer, key_id, reserved, _listing, app_id, end_user, digest, charged = row
    if gate == "x402" and charged == 0:  # nothing to settle: the authorization is never used
        connection.execute(_RELEASE_AUTHORIZATION, {"b_call": call_id})
    if gate == "prepaid":
        connection.execute(_CHARGE_ACCOUNT, {"b_wallet": payer, "b_reserved": reserved, "b_amount": charged})
    if gate in ("prepaid", "sandbox"):
        connection.execute(_CHARGE_KEY, {"b_key": key_id, "b_reserved": reserved, "b_amount": charged})
    if gate == "prepaid" and end_user is not None:
        if _hosted(connection, key_id, payer):
            _charge_user(connection, call_id, app_id, end_user, reserved, charged)
        else:
            connection.execute(
                _CHARGE_CONNECTED, {"b_digest": digest, "b_reserved": reserved, "b_amount": charged}
            )
    return True


_VOID: Final = prepared(
    update(CALLS)
    .where(CALLS.c.id == bindparam("b_call"), CALLS.c.state == "reserved")
    .values(
        state="voided",
        outcome=bindparam("b_outcome"),
        error=bindparam("b_error"),
        updated_at=bindparam("b_now"),
    )
    .returning(*_RETURNED, CALLS.c.created_at)
)
_GIVE_BACK_LISTING_CALL: Final = prepared(
    update(LISTINGS)
    .where(LISTINGS.c.id == bindparam("b_listing"), LISTINGS.c.calls_used > 0)
    .values(calls_used=LISTINGS.c.calls_used - 1)
)
_GIVE_BACK_FREE_CALL: Final = prepared(
    update(PLAYGROUND)
    .where(
        PLAYGROUND.c.listing_id == bindparam("b_listing"),
        PLAYGROUND.c.consumer == bindparam("b_consumer"),
        PLAYGROUND.c.calls > 0,
    )
    .values(calls=PLAYGROUND.c.calls - 1)
)
_RELEASE_ACCOUNT: Final = prepared(
    update(ACCOUNTS)
    .where(ACCOUNTS.c.wallet == bindparam("b_wallet"))
    .values(reserved=ACCOUNTS.c.reserved - _param("b_reserved"))
)
_RELEASE_KEY: Final = prepared(
    update(KEYS)
    .where(KEYS.c.id == bindparam("b_key"))
    .values(reserved=KEYS.c.reserved - _param("b_reserved"))
)


def _void(connection: Connection, call_id: str, outcome: str, error: str | None, now: datetime) -> bool:
    """reserved → voided: nothing is charged, the quota and the budget are given back. False if
    the call was no longer reserved."""
    row = connection.execute(
        _VOID,
        {
            "b_call": call_id,
            "b_outcome": outcome,
            "b_error": None if error is None else error[:300],
            "b_now": now,
        },
    ).first()
    if row is None:
        return False
    gate, payer, key_id, reserved, listing_id, app_id, end_user, digest, created_at = row
    if not (gate == "sandbox" and key_id is not None):  # a sandbox key's call took no listing call
        connection.execute(_GIVE_BACK_LISTING_CALL, {"b_listing": listing_id})
    if gate == "playground":
        connection.execute(
            _GIVE_BACK_DAILY_FREE_CALL, {"b_listing": listing_id, "b_day": utc_day(created_at)}
        )
        connection.execute(_GIVE_BACK_FREE_CALL, {"b_listing": listing_id, "b_consumer": payer})
    elif gate == "prepaid":
        connection.execute(_RELEASE_ACCOUNT, {"b_wallet": payer, "b_reserved": reserved})
        if end_user is not None:
            if _hosted(connection, key_id, payer):
                connection.execute(
                    _RELEASE_USER, {"b_app": app_id, "b_user": end_user, "b_reserved": reserved}
                )
            else:
                connection.execute(_RELEASE_CONNECTED, {"b_digest": digest, "b_reserved": reserved})
    elif gate == "x402":
        connection.execute(_RELEASE_AUTHORIZATION, {"b_call": call_id})
    if gate in ("prepaid", "sandbox"):
        connection.execute(_RELEASE_KEY, {"b_key": key_id, "b_reserved": reserved})
    return True


def _sweep(connection: Connection, now: datetime, limit: int) -> int:
    expired = connection.execute(
        select(CALLS.c.id)
        .where(CALLS.c.state == "reserved", CALLS.c.expires_at < now)
        .order_by(CALLS.c.expires_at)
        .limit(limit)
    ).scalars()
    voided = 0
    for call_id in list(expired):
        voided += _void(
            connection, call_id, "error", "the call never finished (its relay stopped): nothing charged", now
        )
    return voided


def _get(connection: Connection, call_id: str) -> CallView | None:
    row = connection.execute(select(CALLS).where(CALLS.c.id == call_id)).first()
    return None if row is None else CallView.of(row)


def _by_authorization(connection: Connection, payer: str, nonce: str) -> CallView | None:
    row = connection.execute(
        select(CALLS)
        .join(AUTHS, AUTHS.c.call_id == CALLS.c.id)
        .where(AUTHS.c.payer == payer, AUTHS.c.nonce == nonce)
    ).first()
    return None if row is None else CallView.of(row)


class CallStore:
    def __init__(self, engine: AsyncEngine, transactions: Transactions) -> None:
        self.engine = engine
        self.transactions = transactions
        # Called (no arguments, must not block) after a call was captured with something owed:
        # how the settlement worker of this process learns of work without polling for it.
        self.on_capture: list[Callable[[], None]] = []

    async def _read(self, work: Callable[..., Any], *args: Any) -> Any:
        async with self.engine.connect() as connection:
            return await connection.run_sync(work, *args)

    # ---- reserving: one transaction each; `Refused` when a limit says no (nothing written) --------

    async def reserve_open(self, hold: Hold, *, gate: str) -> str:
        call_id = new_call_id()
        await self.transactions.run(_reserve_open, call_id, hold, gate, utcnow())
        return call_id

    async def reserve_playground(self, hold: Hold, *, free_calls: int, daily_default: int) -> str:
        """A free call: `free_calls` per consumer and listing, and the listing's daily budget
        (`daily_default` unless it sets its own) across consumers."""
        call_id = new_call_id()
        await self.transactions.run(_reserve_playground, call_id, hold, free_calls, daily_default, utcnow())
        return call_id

    async def reserve_key(
        self, hold: Hold, *, key_id: str, live: bool, now_ts: int, margin: int
    ) -> tuple[str, Decision | None]:
        """The call's id, and the key's rate-limit decision (for the `RateLimit-*` headers)."""
        call_id = new_call_id()
        rate = await self.transactions.run(
            _reserve_key, call_id, hold, key_id, live, now_ts, margin, utcnow()
        )
        return call_id, rate

    async def reserve_x402(self, hold: Hold, auth: X402Hold) -> str:
        """Raises `Refused("nonce_used", call)` when the authorization already paid for a call
        (a replay: the caller answers with that call's outcome)."""
        call_id = new_call_id()
        try:
            await self.transactions.run(_reserve_x402, call_id, hold, auth, utcnow())
            return call_id
        except IntegrityError:
            earlier = await self.by_authorization(auth.payer, auth.nonce)
            if earlier is None or earlier.state != "voided":
                raise Refused("nonce_used", earlier) from None
        try:
            await self.transactions.run(_rereserve_x402, call_id, hold, auth, earlier.id, utcnow())
        except Refused as refused:
            if refused.reason == "nonce_used":
                raise Refused("nonce_used", await self.by_authorization(auth.payer, auth.nonce)) from None
            raise
        return call_id

    # ---- ending: exactly once, whoever races ---------------------------------------------------------

    async def finish(self, call_id: str, *, amount: int, usage: Served, markup: int = 0) -> bool:
        """The call was served: capture `amount` (paid gates; `markup` of it the app developer's)
        with its usage. False when the call was no longer reserved (swept): then nothing is
        charged."""
        finished = bool(await self.transactions.run(_finish, call_id, amount, markup, usage, utcnow()))
        if finished and amount > 0:
            for listener in self.on_capture:
                listener()
        return finished

    async def void(self, call_id: str, *, outcome: str, error: str | None = None) -> bool:
        return bool(await self.transactions.run(_void, call_id, outcome, error, utcnow()))

    async def sweep(self, now: datetime | None = None) -> int:
        """Voids reservations past their deadline (their call never finished); how many."""
        total = 0
        while True:
            voided = int(await self.transactions.run(_sweep, now or utcnow(), SWEEP_BATCH))
            total += voided
            if voided < SWEEP_BATCH:
                return total

    # ---- reads --------------------------------------------------------------------------------------

    async def get(self, call_id: str) -> CallView | None:
        result: CallView | None = await self._read(_get, call_id)
        return result

    async def by_authorization(self, payer: str, nonce: str) -> CallView | None:
        result: CallView | None = await self._read(_by_authorization, payer, nonce)
        return result

    async def of_payer(
        self, payers: tuple[str, ...], *, limit: int, before: str | None = None
    ) -> list[CallView]:
        """The calls these payer ids paid for (or made for free), newest first; `before` is the
        call id the previous page ended with (ids sort by time)."""

        def work(connection: Connection) -> list[CallView]:
            query = select(CALLS).where(CALLS.c.payer.in_(payers)).order_by(CALLS.c.id.desc()).limit(limit)
            if before is not None:
                query = query.where(CALLS.c.id < before)
            return [CallView.of(row) for row in connection.execute(query)]

        result: list[CallView] = await self._read(work)
        return result
