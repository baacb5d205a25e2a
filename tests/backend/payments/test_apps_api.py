"""Apps through the relay (Quota's billing model): an app's markup charged on top of the base cost
within the developer's permission, end users by header or path with spend limits enforced when a
call is reserved, grants spent before the user's own money, `GET /v1/balance` with a key, per-user
usage and analytics, and who may see what."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest
from eth_account import Account
from prepaid_helpers import MAX_TOKENS, Consumer, PrepaidRelay
from quotra.calls.records import CallView
from quotra.money import markup_of, usdc
from quotra.store.models import Call, table
from sqlalchemy import select

USDC = 10**6
MESSAGES = [{"role": "user", "content": "Hello there, sandbox"}]
CALLS = table(Call)


@pytest.fixture
async def listing(relay: PrepaidRelay) -> dict[str, Any]:
    return await relay.provider_listing(
        models=["sandbox-model"], price_per_call="0.001", price_input_per_mtok="2", price_output_per_mtok="10"
    )


def base_cost(listing: dict[str, Any], completion: Any) -> int:
    """The listing's price of a served call: 0.001 per call, 2 and 10 USDC per 1M tokens."""
    usage = completion.usage
    return int(listing["price_per_call_atomic"]) + 2 * usage.prompt_tokens + 10 * usage.completion_tokens


class Developer:
    """A signed-in developer with a deposit, an app with a markup, its permission and a key."""

    def __init__(self, relay: PrepaidRelay, consumer: Consumer, app: dict[str, Any], key: dict[str, Any]):
        self.relay, self.consumer, self.app, self.key = relay, consumer, app, key

    @property
    def wallet(self) -> str:
        return self.consumer.wallet

    def client(self, **headers: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url="http://testserver/v1",
            api_key=self.key["key"],
            max_retries=0,
            http_client=self.relay.client,
            default_headers=headers,
        )

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key['key']}"}

    async def chat(self, user: str | None = None) -> Any:
        headers = {} if user is None else {"X-Quotra-User": user}
        return await self.client(**headers).chat.completions.create(
            model="sandbox-model",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
        )

    async def get(self, path: str, **params: Any) -> dict[str, Any]:
        reply = await self.relay.client.get(path, params=params, headers=self.auth())
        assert reply.status_code == 200, reply.text
        data: dict[str, Any] = reply.json()
        return data

    async def post(self, path: str, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
        reply = await self.relay.client.post(path, json=body, headers=self.auth())
        assert reply.status_code == status, reply.text
        data: dict[str, Any] = reply.json()
        return data

    async def put_limit(self, user: str, limit: str | None) -> dict[str, Any]:
        reply = await self.relay.client.put(
            f"/v1/apps/{self.app['id']}/users/{user}/limit", json={"spend_limit": limit}, headers=self.auth()
        )
        assert reply.status_code == 200, reply.text
        data: dict[str, Any] = reply.json()
        return data


async def developer(
    relay: PrepaidRelay,
    *,
    markup: str = "20",
    deposit: int = 5 * USDC,
    allowance: int = 2 * USDC,
    sign: bool = True,
) -> Developer:
    consumer = await relay.consumer(deposit=deposit)
    reply = await relay.client.post(
        "/v1/apps", json={"name": "Chat app", "markup_percent": markup}, headers=consumer.headers
    )
    assert reply.status_code == 201, reply.text
    app = reply.json()
    if sign:  # after the app exists: the permission allows its markup by default
        signed = await consumer.sign_permission(allowance)
        assert signed.status_code == 200, signed.text
    reply = await relay.client.post(
        f"/v1/apps/{app['id']}/keys", json={"name": "server"}, headers=consumer.headers
    )
    assert reply.status_code == 201, reply.text
    return Developer(relay, consumer, app, reply.json())


async def calls_of(relay: PrepaidRelay, wallet: str) -> list[CallView]:
    query = select(CALLS).where(CALLS.c.payer == wallet).order_by(CALLS.c.created_at, CALLS.c.id)
    async with relay.runtime.store.engine.connect() as connection:
        return [CallView.of(row) for row in await connection.execute(query)]


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    error: dict[str, Any] = exc.response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    return error


# ---- apps and the markup ---------------------------------------------------------------------------


async def test_app_call__charges_base_plus_markup__markup_recorded(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay, markup="20")
    assert dev.app["markup_bps"] == 2_000 and dev.app["markup_percent"] == "20.00"
    assert dev.key["app_id"] == dev.app["id"]
    account = await dev.get("/v1/balance")
    assert account["available_atomic"] == 2 * USDC

    raw = await dev.client().chat.completions.with_raw_response.create(
        model="sandbox-model",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
    )
    completion = raw.parse()

    base = base_cost(listing, completion)
    markup = markup_of(base, 2_000)
    assert markup == base // 5 > 0
    assert raw.headers["x-quotra-cost"] == str(base + markup)
    (call,) = await calls_of(relay, dev.wallet)
    assert (call.state, call.app_id, call.end_user) == ("captured", dev.app["id"], None)
    assert (call.amount, call.markup, call.granted) == (base + markup, markup, 0)
    assert (await dev.consumer.account_state()).unsettled == base + markup
    # The permission the developer signed names it and allows the app's markup.
    permission = (await dev.consumer.get("/v1/account"))["permission"]
    assert (permission["developer"], permission["max_markup_bps"]) == (dev.wallet, 2_000)
    assert (await dev.get(f"/v1/apps/{dev.app['id']}"))["permission_allows_markup"] is True


async def test_app_call__permission_without_the_markup__402_nothing_reserved(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay, markup="20", sign=False)
    assert (await dev.consumer.sign_permission(2 * USDC, max_markup_bps=1_000)).status_code == 200
    assert (await dev.get(f"/v1/apps/{dev.app['id']}"))["permission_allows_markup"] is False

    with pytest.raises(openai.APIStatusError) as refused:
        await dev.chat()

    assert refused.value.status_code == 402
    error = error_of(refused.value)
    assert error["code"] == "markup_not_permitted"
    assert "max_markup_bps=2000" in error["message"]
    assert await calls_of(relay, dev.wallet) == []
    assert (await dev.consumer.account_state()).reserved == 0


async def test_app_markup_change__applies_to_new_calls_within_the_permission(
    relay: PrepaidRelay, listing: dict[str, Any], start: Callable[..., Any]
) -> None:
    dev = await developer(relay, markup="20")
    reply = await relay.client.patch(
        f"/v1/apps/{dev.app['id']}", json={"markup_percent": "5.5"}, headers=dev.consumer.headers
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["markup_bps"] == 550
    relay.prepaid._keys.clear()  # the key cache (seconds) would carry the old markup a little longer
    completion = await dev.chat()
    (call,) = await calls_of(relay, dev.wallet)
    assert call.markup == markup_of(base_cost(listing, completion), 550)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "markup_percent": "-1"}, "markup_percent"),
        ({"name": "x", "markup_percent": "1000.01"}, "markup_percent"),
        ({"name": "x", "markup_percent": "1.234"}, "markup_percent"),
        ({"name": ""}, "name"),
        ({"name": "x", "fee": 1}, "fee"),
    ],
)
async def test_create_app__bad_input__400(relay: PrepaidRelay, body: dict[str, Any], param: str) -> None:
    consumer = await relay.consumer()
    reply = await relay.client.post("/v1/apps", json=body, headers=consumer.headers)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


async def test_apps__need_sign_in__and_are_the_owners_only(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay)
    other = await developer(relay)
    app_id = dev.app["id"]
    assert (await relay.client.post("/v1/apps", json={"name": "x"})).status_code == 401
    for path in (f"/v1/apps/{app_id}", f"/v1/apps/{app_id}/users", f"/v1/apps/{app_id}/analytics"):
        for headers in (other.auth(), other.consumer.headers):
            reply = await relay.client.get(path, headers=headers)
            assert reply.status_code == 404, (path, reply.text)
            assert reply.json()["error"]["code"] == "app_not_found"
    keys = await relay.client.post(f"/v1/apps/{app_id}/keys", json={}, headers=other.consumer.headers)
    assert keys.status_code == 404
    # The app's own key reads it, but cannot manage it (that takes the developer's session).
    assert (await dev.get(f"/v1/apps/{app_id}"))["id"] == app_id
    assert (
        await relay.client.post(f"/v1/apps/{app_id}/keys", json={}, headers=dev.auth())
    ).status_code == 401


# ---- end users and their limits --------------------------------------------------------------------


async def test_end_user__by_header_and_by_path__usage_per_user(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay)
    await dev.chat("alice")
    reply = await relay.client.post(
        "/v1/users/bob@example.com/chat/completions",
        json={"model": "sandbox-model", "messages": MESSAGES, "max_tokens": MAX_TOKENS},
        headers=dev.auth(),
    )
    assert reply.status_code == 200, reply.text
    await dev.chat()  # the developer's own call, for no end user

    calls = await calls_of(relay, dev.wallet)
    assert [c.end_user for c in calls] == ["alice", "bob@example.com", None]
    usage = await dev.get(f"/v1/apps/{dev.app['id']}/users/alice/usage")
    assert [(u["id"], u["end_user"], u["price_atomic"]) for u in usage["data"]] == [
        (calls[0].id, "alice", calls[0].amount)
    ]
    alice = await dev.get(f"/v1/apps/{dev.app['id']}/users/alice")
    assert (alice["spent_atomic"], alice["reserved_atomic"], alice["spend_limit"]) == (
        calls[0].amount,
        0,
        None,
    )
    users = await dev.get(f"/v1/apps/{dev.app['id']}/users")
    assert [u["id"] for u in users["data"]] == ["alice", "bob@example.com"]


@pytest.mark.parametrize(
    ("headers", "code"),
    [({"X-Quotra-User": "bad user"}, "invalid_end_user"), ({"X-Quotra-User": "-x"}, "invalid_end_user")],
)
async def test_end_user__bad_id__400(
    relay: PrepaidRelay, listing: dict[str, Any], headers: dict[str, str], code: str
) -> None:
    dev = await developer(relay)
    reply = await relay.client.post(
        "/v1/chat/completions",
        json={"model": "sandbox-model", "messages": MESSAGES},
        headers={**dev.auth(), **headers},
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == code
    assert await calls_of(relay, dev.wallet) == []


async def test_end_user__plain_key__400(relay: PrepaidRelay, listing: dict[str, Any]) -> None:
    consumer = await relay.consumer(deposit=5 * USDC, allowance=2 * USDC)
    key = await consumer.key()
    reply = await relay.client.post(
        "/v1/users/alice/chat/completions",
        json={"model": "sandbox-model", "messages": MESSAGES},
        headers={"Authorization": f"Bearer {key['key']}"},
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "end_user_needs_app_key"


async def test_end_user_over_limit__402__nothing_reserved(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay)
    await dev.put_limit("carol", "0.000100")  # far below one call's most cost

    with pytest.raises(openai.APIStatusError) as refused:
        await dev.chat("carol")

    assert refused.value.status_code == 402
    error = error_of(refused.value)
    assert error["code"] == "user_spend_limit_reached"
    assert error["end_user"]["id"] == "carol"
    assert await calls_of(relay, dev.wallet) == []
    account = await dev.consumer.account_state()
    assert (account.reserved, account.unsettled) == (0, 0)
    key = await dev.consumer.key_state(dev.key["id"])
    assert (key.reserved, key.spent) == (0, 0)
    # Another user of the app, and the same one once its limit is lifted, are served.
    await dev.chat("dave")
    limited = await dev.put_limit("carol", None)
    assert limited["spend_limit"] is None
    await dev.chat("carol")


async def test_end_user_limit__caps_own_spending_in_total(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay)
    completion = await dev.chat("erin")  # no limit yet
    spent = (await calls_of(relay, dev.wallet))[0].amount
    assert spent == base_cost(listing, completion) + markup_of(base_cost(listing, completion), 2_000)
    # A limit of what is already spent leaves nothing for another call.
    await dev.put_limit("erin", usdc(spent))
    with pytest.raises(openai.APIStatusError) as refused:
        await dev.chat("erin")
    assert error_of(refused.value)["code"] == "user_spend_limit_reached"
    erin = await dev.get(f"/v1/apps/{dev.app['id']}/users/erin")
    assert (erin["spent_atomic"], erin["limit_remaining_atomic"]) == (spent, 0)


# ---- user billing: an end user pays with its own wallet ------------------------------------------


async def connect(dev: Developer, user: str, wallet: Any, allowance: str = "1", **tamper: Any) -> Any:
    """The end user's wallet signs the permission the app offers it; the app registers it."""
    typed = await dev.get(
        f"/v1/apps/{dev.app['id']}/users/{user}/wallet/typed-data", wallet=wallet.address, allowance=allowance
    )
    message = {**typed["typed_data"]["message"], **tamper}
    signed = Account.sign_typed_data(wallet.key, full_message={**typed["typed_data"], "message": message})
    return await dev.relay.client.post(
        f"/v1/apps/{dev.app['id']}/users/{user}/wallet",
        json={"permission": message, "signature": "0x" + bytes(signed.signature).hex()},
        headers=dev.auth(),
    )


async def test_user_billing__connected_wallet_pays_its_calls__markup_to_developer(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay)
    wallet = Account.create()
    relay.chain.deposits[wallet.address] = 2 * USDC
    reply = await connect(dev, "walt", wallet)
    assert reply.status_code == 200, reply.text
    assert reply.json()["wallet"] == wallet.address

    completion = await dev.chat("walt")
    base = base_cost(listing, completion)
    (call,) = await calls_of(relay, wallet.address)
    assert (call.payer, call.amount, call.markup, call.end_user) == (
        wallet.address,
        base + markup_of(base, 2_000),
        markup_of(base, 2_000),
        "walt",
    )
    # The user's own deposit pays, under its permission naming the developer; not the developer's.
    user_account = await relay.prepaid.repo.get_account(wallet.address)
    assert user_account is not None and user_account.unsettled == call.amount
    permission = await relay.prepaid.repo.get_permission(call.permission_digest or "")
    assert permission is not None and (permission.developer, permission.max_markup_bps) == (dev.wallet, 2_000)
    assert (await dev.consumer.account_state()).unsettled == 0 and await calls_of(relay, dev.wallet) == []
    walt = await dev.get(f"/v1/apps/{dev.app['id']}/users/walt")
    assert (walt["spent_atomic"], walt["grant_used_atomic"], walt["reserved_atomic"]) == (0, 0, 0)
    balance = await dev.get("/v1/balance", user="walt")
    assert balance["user"]["available_atomic"] == USDC - call.amount  # its allowance left

    # Its deposit spent, the user (not the developer) is told to top up.
    relay.chain.deposits[wallet.address] = call.amount
    await relay.prepaid.refresh(wallet.address)
    with pytest.raises(openai.APIStatusError) as refused:
        await dev.chat("walt")
    assert (refused.value.status_code, refused.value.code) == (402, "user_insufficient_balance")


async def test_user_billing__permission_not_for_the_app__400(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay)
    wallet = Account.create()
    for tamper in ({"developer": wallet.address}, {"max_markup_bps": 1_999}):
        reply = await connect(dev, "walt", wallet, **tamper)
        assert (reply.status_code, reply.json()["error"]["code"]) == (400, "permission_not_for_app"), tamper
    assert (await dev.get(f"/v1/apps/{dev.app['id']}/users/walt"))["wallet"] is None


# ---- grants ----------------------------------------------------------------------------------------


async def test_grant__spent_before_the_users_own_money(relay: PrepaidRelay, listing: dict[str, Any]) -> None:
    dev = await developer(relay)
    first = await dev.chat("frank")  # how much one call costs, paid by frank's own money
    one = base_cost(listing, first) + markup_of(base_cost(listing, first), 2_000)
    grant = await dev.post(
        "/v1/funding/grant",
        {"external_user_id": "frank", "amount": usdc(one + one // 2), "description": "welcome"},
    )
    assert (grant["app_id"], grant["amount_atomic"], grant["description"]) == (
        dev.app["id"],
        one + one // 2,
        "welcome",
    )
    assert grant["user"]["grant_remaining_atomic"] == one + one // 2

    await dev.chat("frank")  # all of it out of the grant
    await dev.chat("frank")  # the grant's last half call, then frank's own money

    calls = await calls_of(relay, dev.wallet)
    assert [(c.amount, c.granted) for c in calls] == [(one, 0), (one, one), (one, one // 2)]
    frank = await dev.get(f"/v1/apps/{dev.app['id']}/users/frank")
    assert frank["granted_atomic"] == frank["grant_used_atomic"] == one + one // 2
    assert (frank["grant_remaining_atomic"], frank["spent_atomic"]) == (0, one + one - one // 2)
    usage = await dev.get(f"/v1/apps/{dev.app['id']}/users/frank/usage")
    assert [u["granted_atomic"] for u in usage["data"]] == [one // 2, one, 0]
    # Everything is charged to the developer's deposit, grants included.
    assert (await dev.consumer.account_state()).unsettled == 3 * one


async def test_grant__lets_a_limited_user_spend_past_its_own_limit(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay)
    await dev.put_limit("gina", "0")
    with pytest.raises(openai.APIStatusError) as refused:
        await dev.chat("gina")
    assert refused.value.status_code == 402
    assert refused.value.code == "user_spend_limit_reached"
    await dev.post("/v1/funding/grant", {"external_user_id": "gina", "amount": "0.05"})
    await dev.chat("gina")
    (call,) = await calls_of(relay, dev.wallet)
    assert call.granted == call.amount
    gina = await dev.get(f"/v1/apps/{dev.app['id']}/users/gina")
    assert (gina["spent_atomic"], gina["grant_used_atomic"]) == (0, call.amount)


async def test_grant__beyond_the_developers_balance__402(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay, allowance=USDC)
    await dev.post("/v1/funding/grant", {"external_user_id": "a", "amount": "0.6"})
    reply = await relay.client.post(
        "/v1/funding/grant", json={"external_user_id": "b", "amount": "0.5"}, headers=dev.auth()
    )
    assert reply.status_code == 402, reply.text
    assert reply.json()["error"]["code"] == "insufficient_balance"
    balance = await dev.get("/v1/balance")
    assert (balance["available_atomic"], balance["grants_outstanding_atomic"]) == (USDC, 600_000)


@pytest.mark.parametrize(
    "body",
    [
        {"amount": "1"},
        {"external_user_id": "a", "wallet": "0x" + "11" * 20, "amount": "1"},
        {"external_user_id": "a", "amount": "0"},
        {"external_user_id": "a", "amount": "-1"},
        {"external_user_id": "bad id", "amount": "1"},
        {"wallet": "0x123", "amount": "1"},
    ],
)
async def test_grant__bad_input__400(
    relay: PrepaidRelay, listing: dict[str, Any], body: dict[str, Any]
) -> None:
    dev = await developer(relay)
    reply = await relay.client.post("/v1/funding/grant", json=body, headers=dev.auth())
    assert reply.status_code == 400, reply.text


async def test_grant__with_a_session_needs_the_app(relay: PrepaidRelay, listing: dict[str, Any]) -> None:
    dev = await developer(relay)
    body = {"external_user_id": "h", "amount": "0.01"}
    reply = await relay.client.post("/v1/funding/grant", json=body, headers=dev.consumer.headers)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "app_id"
    reply = await relay.client.post(
        "/v1/funding/grant", json={**body, "app_id": dev.app["id"]}, headers=dev.consumer.headers
    )
    assert reply.status_code == 201, reply.text


async def test_grant_to_a_wallet__is_the_developers_onchain_deposit(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay)
    wallet = Account.create().address
    body = {"wallet": wallet, "amount": "1.5", "description": "beta tester"}
    reply = await relay.client.post("/v1/funding/grant", json=body, headers=dev.auth())
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "grant_needs_deposit"
    assert f"--for {wallet}" in error["message"]

    tx = "0x" + "ab" * 32
    unknown = await relay.client.post("/v1/funding/grant", json={**body, "tx_hash": tx}, headers=dev.auth())
    assert unknown.json()["error"]["code"] == "grant_deposit_not_found"
    relay.chain.receipts[tx] = [(dev.wallet, wallet, 1_500_000)]
    grant = await dev.post("/v1/funding/grant", {**body, "tx_hash": tx})
    assert (grant["wallet"], grant["amount_atomic"], grant["tx_hash"], grant["user"]) == (
        wallet,
        1_500_000,
        tx,
        None,
    )
    again = await relay.client.post("/v1/funding/grant", json={**body, "tx_hash": tx}, headers=dev.auth())
    assert again.json()["error"]["code"] == "grant_exists"
    # Someone else's deposit, or another amount, is not this developer's grant.
    other = "0x" + "cd" * 32
    relay.chain.receipts[other] = [(Account.create().address, wallet, 1_500_000)]
    reply = await relay.client.post("/v1/funding/grant", json={**body, "tx_hash": other}, headers=dev.auth())
    assert reply.json()["error"]["code"] == "grant_deposit_not_found"
    grants = await dev.get(f"/v1/apps/{dev.app['id']}/grants")
    assert [g["id"] for g in grants["data"]] == [grant["id"]]


# ---- balance and analytics -------------------------------------------------------------------------


async def test_balance__with_the_key__developer_and_end_user(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay)
    await dev.post("/v1/funding/grant", {"external_user_id": "ivy", "amount": "0.2"})
    await dev.put_limit("ivy", "0.1")
    await dev.chat("ivy")
    (call,) = await calls_of(relay, dev.wallet)

    mine = await dev.get("/v1/balance")
    assert mine["wallet"] == dev.wallet and mine["app"] == dev.app["id"]
    assert mine["available_atomic"] == 2 * USDC - call.amount
    assert mine["available"] == usdc(2 * USDC - call.amount)
    assert mine["grants_outstanding_atomic"] == 200_000 - call.amount
    assert mine["user"] is None

    for ivy in (
        (await dev.get("/v1/balance", user="ivy"))["user"],
        (await relay.client.get("/v1/balance", headers={**dev.auth(), "X-Quotra-User": "ivy"})).json()[
            "user"
        ],
    ):
        assert ivy["id"] == "ivy"
        assert (ivy["granted_atomic"], ivy["grant_used_atomic"]) == (200_000, call.amount)
        assert (ivy["spent_atomic"], ivy["spend_limit_atomic"], ivy["limit_remaining_atomic"]) == (
            0,
            100_000,
            100_000,
        )
        assert ivy["available_atomic"] == 300_000 - call.amount
        assert ivy["available"] == usdc(300_000 - call.amount)


async def test_balance__plain_key_and_session__and_refusals(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    consumer = await relay.consumer(deposit=5 * USDC, allowance=2 * USDC)
    key = await consumer.key()
    plain = await relay.client.get("/v1/balance", headers={"Authorization": f"Bearer {key['key']}"})
    assert plain.status_code == 200, plain.text
    assert (plain.json()["available_atomic"], plain.json()["app"]) == (2 * USDC, None)
    assert (plain.json()["key"]["id"], plain.json()["key"]["mode"]) == (key["id"], "live")
    assert (await relay.client.get("/v1/balance", headers=consumer.headers)).json()[
        "available_atomic"
    ] == 2 * USDC
    assert (await relay.client.get("/v1/balance")).status_code == 401
    bad = await relay.client.get("/v1/balance", headers={"Authorization": "Bearer sk-quotra-live-nope"})
    assert bad.status_code == 401
    no_app = await relay.client.get(
        "/v1/balance", params={"user": "x"}, headers={"Authorization": f"Bearer {key['key']}"}
    )
    assert no_app.status_code == 400


async def test_analytics__cost_and_markup_revenue_per_app_and_end_user(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay)
    await dev.post("/v1/funding/grant", {"external_user_id": "kim", "amount": "0.001"})
    for user in ("kim", "kim", "lee", None):
        await dev.chat(user)
    calls = await calls_of(relay, dev.wallet)

    report = await dev.get(f"/v1/apps/{dev.app['id']}/analytics")

    def totals(chosen: list[CallView]) -> dict[str, int]:
        return {
            "calls": len(chosen),
            "cost_atomic": sum(c.amount for c in chosen),
            "base_cost_atomic": sum(c.amount - c.markup for c in chosen),
            "markup_revenue_atomic": sum(c.markup for c in chosen),
            "granted_atomic": sum(c.granted for c in chosen),
        }

    def picked(view: dict[str, Any]) -> dict[str, int]:
        return {
            k: view[k]
            for k in ("calls", "cost_atomic", "base_cost_atomic", "markup_revenue_atomic", "granted_atomic")
        }

    assert picked(report["totals"]) == totals(calls)
    assert report["totals"]["markup_revenue_atomic"] > 0
    per_user = {u["end_user"]: picked(u) for u in report["end_users"]}
    assert per_user == {
        "kim": totals([c for c in calls if c.end_user == "kim"]),
        "lee": totals([c for c in calls if c.end_user == "lee"]),
        None: totals([c for c in calls if c.end_user is None]),
    }
    assert per_user["kim"]["granted_atomic"] == 1_000
    # A range before the calls has none; an empty range is refused.
    early = await dev.get(f"/v1/apps/{dev.app['id']}/analytics", end="2020-01-01T00:00:00Z")
    assert early["totals"]["calls"] == 0 and early["end_users"] == []
    reply = await relay.client.get(
        f"/v1/apps/{dev.app['id']}/analytics",
        params={"start": "2030-01-02T00:00:00Z", "end": "2030-01-01T00:00:00Z"},
        headers=dev.auth(),
    )
    assert reply.status_code == 400


# ---- permissions with a markup -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_markup_bps": 100_001}, "permission.max_markup_bps"),
        ({"developer": "0x" + "00" * 20}, "permission.developer"),
    ],
)
async def test_register_permission__bad_markup_terms__400(
    relay: PrepaidRelay, change: dict[str, Any], param: str
) -> None:
    consumer = await relay.consumer(deposit=USDC)
    typed = await consumer.typed_data(USDC, max_markup_bps=500)
    message = {**typed["message"], **change}
    typed["message"] = message
    signed = Account.sign_typed_data(consumer.account.key, full_message=typed)
    reply = await consumer.register(message, "0x" + bytes(signed.signature).hex())
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


# ---- one wallet, several apps; disconnecting ------------------------------------------------------


async def connected_user(relay: PrepaidRelay, deposit: int = 3 * USDC) -> Consumer:
    """An end user's wallet, signed in, with a deposit and its own permission (for its own keys)."""
    return await relay.consumer(deposit=deposit, allowance=USDC)


async def test_user_billing__one_wallet_two_apps__each_charged_under_its_own_permission(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    tutor, writer = await developer(relay, markup="20"), await developer(relay, markup="10")
    user = await connected_user(relay)
    own = (await user.account_state()).permission_digest
    assert (await connect(tutor, "ann", user.account, allowance="1")).status_code == 200
    assert (await connect(writer, "w-17", user.account, allowance="0.002")).status_code == 200
    ann = await tutor.get(f"/v1/apps/{tutor.app['id']}/users/ann")
    w17 = await writer.get(f"/v1/apps/{writer.app['id']}/users/w-17")
    assert ann["wallet"] == w17["wallet"] == user.wallet
    assert None is not ann["permission_digest"] != w17["permission_digest"] is not None

    first, second = await tutor.chat("ann"), await writer.chat("w-17")

    calls = await calls_of(relay, user.wallet)
    assert [(c.app_id, c.end_user, c.permission_digest) for c in calls] == [
        (tutor.app["id"], "ann", ann["permission_digest"]),
        (writer.app["id"], "w-17", w17["permission_digest"]),
    ]
    for call, dev, completion, bps in ((calls[0], tutor, first, 2_000), (calls[1], writer, second, 1_000)):
        base = base_cost(listing, completion)
        assert (call.amount, call.markup) == (base + markup_of(base, bps), markup_of(base, bps))
        permission = await relay.prepaid.repo.get_permission(call.permission_digest or "")
        assert permission is not None
        assert (permission.developer, permission.max_markup_bps) == (dev.wallet, bps)
        assert (permission.reserved, permission.unsettled) == (0, call.amount)  # its own budget
    # The developers pay nothing; the wallet's own permission stays its own, untouched.
    assert await calls_of(relay, tutor.wallet) == [] and await calls_of(relay, writer.wallet) == []
    state = await user.account_state()
    assert (state.permission_digest, state.unsettled) == (own, calls[0].amount + calls[1].amount)

    listed = (await user.get("/v1/account/apps"))["data"]
    assert [(c["app_id"], c["user_id"], c["developer"], c["remaining_atomic"]) for c in listed] == sorted(
        [
            (tutor.app["id"], "ann", tutor.wallet, USDC - calls[0].amount),
            (writer.app["id"], "w-17", writer.wallet, 2_000 - calls[1].amount),
        ]
    )
    # The writer's permission is used up; the tutor's still pays.
    with pytest.raises(openai.APIStatusError) as refused:
        await writer.chat("w-17")
    assert (refused.value.status_code, refused.value.code) == (402, "user_insufficient_balance")
    await tutor.chat("ann")
    assert len(await calls_of(relay, user.wallet)) == 3


async def test_disconnect__by_the_wallet__the_app_bills_its_developer_again(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    tutor, writer = await developer(relay), await developer(relay)
    user = await connected_user(relay)
    for dev, name in ((tutor, "ann"), (writer, "w-17")):
        assert (await connect(dev, name, user.account)).status_code == 200
    digest = (await tutor.get(f"/v1/apps/{tutor.app['id']}/users/ann"))["permission_digest"]

    reply = await relay.client.delete(f"/v1/account/apps/{tutor.app['id']}", headers=user.headers)

    assert reply.status_code == 200, reply.text
    assert reply.json() == {
        "object": "app_connection.deleted",
        "app_id": tutor.app["id"],
        "user_ids": ["ann"],
        "deleted": True,
    }
    assert [c["app_id"] for c in (await user.get("/v1/account/apps"))["data"]] == [writer.app["id"]]
    assert (await tutor.get(f"/v1/apps/{tutor.app['id']}/users/ann"))["wallet"] is None
    permission = await relay.prepaid.repo.get_permission(digest)
    assert permission is not None and permission.revoked_at is not None
    # The app's calls for the user are billed to its developer (the README: developer billing).
    await tutor.chat("ann")
    (call,) = await calls_of(relay, tutor.wallet)
    assert (call.end_user, call.permission_digest) == (
        "ann",
        (await tutor.consumer.account_state()).permission_digest,
    )
    assert await calls_of(relay, user.wallet) == []
    # The other app still charges the wallet.
    await writer.chat("w-17")
    assert [c.app_id for c in await calls_of(relay, user.wallet)] == [writer.app["id"]]
    # The app cannot connect the wallet again with the permission it kept.
    typed = {"permission": {**_permission_message(permission)}, "signature": permission.signature}
    again = await relay.client.post(
        f"/v1/apps/{tutor.app['id']}/users/ann/wallet", json=typed, headers=tutor.auth()
    )
    assert (again.status_code, again.json()["error"]["code"]) == (400, "permission_revoked")
    gone = await relay.client.delete(f"/v1/account/apps/{tutor.app['id']}", headers=user.headers)
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "app_not_connected")


def _permission_message(permission: Any) -> dict[str, Any]:
    return {
        "consumer": permission.consumer,
        "spender": permission.spender,
        "allowance": permission.allowance,
        "valid_after": permission.valid_after,
        "valid_until": permission.valid_until,
        "salt": int(permission.salt, 16),
        "developer": permission.developer,
        "max_markup_bps": permission.max_markup_bps,
    }


async def test_disconnect__by_the_developer__unlinks_one_user_only(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay)
    user = await connected_user(relay)
    for name in ("ann", "ann-2"):
        assert (await connect(dev, name, user.account)).status_code == 200

    reply = await relay.client.delete(f"/v1/apps/{dev.app['id']}/users/ann/wallet", headers=dev.auth())

    assert reply.status_code == 200, reply.text
    assert (reply.json()["id"], reply.json()["wallet"], reply.json()["permission_digest"]) == (
        "ann",
        None,
        None,
    )
    assert (await dev.get(f"/v1/apps/{dev.app['id']}/users/ann-2"))["wallet"] == user.wallet
    await dev.chat("ann")
    await dev.chat("ann-2")
    assert [c.end_user for c in await calls_of(relay, dev.wallet)] == ["ann"]
    assert [c.end_user for c in await calls_of(relay, user.wallet)] == ["ann-2"]
    again = await relay.client.delete(f"/v1/apps/{dev.app['id']}/users/ann/wallet", headers=dev.auth())
    assert (again.status_code, again.json()["error"]["code"]) == (404, "wallet_not_connected")
    # A permission two of the app's users pay with stays usable for the one still connected.
    shared = await relay.prepaid.repo.get_permission(
        (await dev.get(f"/v1/apps/{dev.app['id']}/users/ann-2"))["permission_digest"]
    )
    assert shared is not None
    body = {"permission": _permission_message(shared), "signature": shared.signature}
    linked = await relay.client.post(
        f"/v1/apps/{dev.app['id']}/users/ann-3/wallet", json=body, headers=dev.auth()
    )
    assert linked.status_code == 200, linked.text
    gone = await relay.client.delete(f"/v1/apps/{dev.app['id']}/users/ann-2/wallet", headers=dev.auth())
    assert gone.status_code == 200, gone.text
    await dev.chat("ann-3")
    assert [c.end_user for c in await calls_of(relay, user.wallet)] == ["ann-2", "ann-3"]


async def test_disconnect__unauthorised__401_or_404__nothing_changes(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev, other = await developer(relay), await developer(relay)
    user, stranger = await connected_user(relay), await connected_user(relay)
    assert (await connect(dev, "ann", user.account)).status_code == 200
    path = f"/v1/apps/{dev.app['id']}/users/ann/wallet"

    refusals = [
        (await relay.client.delete(path), 401),
        (await relay.client.delete(path, headers=other.auth()), 404),  # another developer's key
        (await relay.client.delete(path, headers=other.consumer.headers), 404),  # its session
        (await relay.client.delete(path, headers=user.headers), 404),  # the user: its own route
        (await relay.client.delete(f"/v1/account/apps/{dev.app['id']}"), 401),
        (await relay.client.delete(f"/v1/account/apps/{dev.app['id']}", headers=stranger.headers), 404),
        (await relay.client.delete(f"/v1/account/apps/{dev.app['id']}", headers=dev.auth()), 401),  # a key
        (await relay.client.delete("/v1/account/apps/not-an-app", headers=user.headers), 400),
    ]

    for reply, status in refusals:
        assert reply.status_code == status, reply.text
        assert set(reply.json()["error"]) >= {"message", "type", "param", "code"}
    assert (await dev.get(f"/v1/apps/{dev.app['id']}/users/ann"))["wallet"] == user.wallet
    await dev.chat("ann")
    assert [c.end_user for c in await calls_of(relay, user.wallet)] == ["ann"]


async def test_connection_revoked_onchain__refused_402__nothing_charged(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay)
    user = await connected_user(relay)
    assert (await connect(dev, "ann", user.account)).status_code == 200
    digest = (await dev.get(f"/v1/apps/{dev.app['id']}/users/ann"))["permission_digest"]
    relay.chain.revoked.add((user.wallet, bytes.fromhex(digest[2:])))  # revoke_permission, on-chain

    await relay.prepaid.refresh(user.wallet)  # what the background refresh reads

    with pytest.raises(openai.APIStatusError) as refused:
        await dev.chat("ann")
    assert (refused.value.status_code, refused.value.code) == (402, "user_permission_revoked")
    assert "DELETE /v1/apps/{app_id}/users/{user_id}/wallet" in error_of(refused.value)["message"]
    assert await calls_of(relay, user.wallet) == [] and await calls_of(relay, dev.wallet) == []
    ((connection),) = (await user.get("/v1/account/apps"))["data"]
    assert (connection["revoked"], connection["remaining_atomic"]) == (True, 0)
    assert (await dev.get("/v1/balance", user="ann"))["user"]["available_atomic"] == 0
    # Its own permission, and so the wallet's own keys, are untouched.
    assert (await user.get("/v1/account"))["permission"]["revoked"] is False


async def test_connect__the_wallets_own_permission_or_its_own_app__400(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay)
    reply = await connect(dev, "me", dev.consumer.account)
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "permission_not_for_app")
    user = await connected_user(relay)
    assert (await connect(dev, "ann", user.account)).status_code == 200
    connected = await relay.prepaid.repo.get_permission(
        (await dev.get(f"/v1/apps/{dev.app['id']}/users/ann"))["permission_digest"]
    )
    assert connected is not None
    own = await user.register(_permission_message(connected), connected.signature)
    assert (own.status_code, own.json()["error"]["code"]) == (400, "permission_connected")


async def test_openapi__disconnect_routes_documented(relay: PrepaidRelay) -> None:
    paths = (await relay.client.get("/openapi.json")).json()["paths"]
    for path in ("/v1/apps/{app_id}/users/{user_id}/wallet", "/v1/account/apps/{app_id}"):
        responses = paths[path]["delete"]["responses"]
        assert {"200", "401", "404"} <= set(responses), path
        assert responses["404"]["description"] != responses["401"]["description"]
    assert "get" in paths["/v1/account/apps"]


async def test_connection__markup_raised_past_it__402_then_revocable_without_eth(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    dev = await developer(relay, markup="20")
    user = await connected_user(relay)
    assert (await connect(dev, "ann", user.account)).status_code == 200
    digest = (await dev.get(f"/v1/apps/{dev.app['id']}/users/ann"))["permission_digest"]
    reply = await relay.client.patch(
        f"/v1/apps/{dev.app['id']}", json={"markup_percent": "25"}, headers=dev.consumer.headers
    )
    assert reply.status_code == 200, reply.text
    relay.prepaid._keys.clear()  # the key cache (seconds) would carry the old markup a little longer

    with pytest.raises(openai.APIStatusError) as refused:
        await dev.chat("ann")

    assert (refused.value.status_code, refused.value.code) == (402, "user_markup_not_permitted")
    assert "2000 basis points, less than the app's 2500" in error_of(refused.value)["message"]
    assert await calls_of(relay, user.wallet) == []
    # The user may revoke that permission gaslessly: its Revocation, by digest.
    typed = await user.get("/v1/account/permission/revocation/typed-data", digest=digest)
    assert typed["typed_data"]["message"]["item"].lower() == digest.lower()
    own = await user.get("/v1/account/permission/revocation/typed-data")
    assert own["typed_data"]["message"]["item"].lower() == (await user.account_state()).permission_digest
    other = await relay.client.get(
        "/v1/account/permission/revocation/typed-data",
        params={"digest": digest},
        headers=dev.consumer.headers,
    )
    assert (other.status_code, other.json()["error"]["code"]) == (404, "no_permission")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/apps", {"name": "a\u0000b"}),
        ("/v1/apps", {"name": "tab\there"}),
    ],
)
async def test_app_text__control_characters__400(
    relay: PrepaidRelay, path: str, body: dict[str, Any]
) -> None:
    """PostgreSQL refuses NUL in text: a name with a control character is a 400, never a 500."""
    consumer = await relay.consumer()
    reply = await relay.client.post(path, json=body, headers=consumer.headers)
    assert (reply.status_code, reply.json()["error"]["param"]) == (400, "name"), reply.text
