"""Prepaid API keys end to end through the relay, driven by the official `openai` SDK: exact
reservations and captures (one call row each), voids on failure, 402 with top-up advice, key caps,
revocation, sandbox keys, permission registration, the sweeper, and the account, usage and
`GET /v1/calls/{id}` endpoints."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest
from eth_account import Account
from eth_utils import to_checksum_address
from prepaid_helpers import (
    MAX_TOKENS,
    OPERATOR,
    WITHDRAWAL_UNLOCKS_AT,
    Consumer,
    PrepaidRelay,
)
from quotra.calls.records import CallView
from quotra.calls.store import Served
from quotra.chain import eip712
from quotra.money import allocate_fees
from quotra.services.relay import estimate_tokens
from quotra.store.models import ApiKeyRecord, Call, table
from quotra.upstream import get_adapter
from relay_helpers import FakeUpstream
from sqlalchemy import select

USDC = 10**6
PROMPT = "Hello there, sandbox"
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture
async def listing(relay: PrepaidRelay) -> dict[str, Any]:
    return await relay.provider_listing(
        models=["sandbox-model", "sandbox-error-503"],
        price_per_call="0.001",
        price_input_per_mtok="2",
        price_output_per_mtok="10",
    )


def priced(listing: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> int:
    """The listing's price: 0.001 per call, 2 USDC per 1M input and 10 per 1M output tokens."""
    return int(listing["price_per_call_atomic"]) + 2 * prompt_tokens + 10 * completion_tokens


def max_cost(listing: dict[str, Any]) -> int:
    return priced(listing, estimate_tokens(len(PROMPT), 1), MAX_TOKENS)


CALLS = table(Call)


async def charges(relay: PrepaidRelay, wallet: str) -> list[CallView]:
    """The calls `wallet` paid for with its keys, oldest first."""
    query = select(CALLS).where(CALLS.c.payer == wallet).order_by(CALLS.c.created_at, CALLS.c.id)
    async with relay.runtime.store.engine.connect() as connection:
        return [CallView.of(row) for row in await connection.execute(query)]


async def calls_used(relay: PrepaidRelay, listing: dict[str, Any]) -> int:
    record = await relay.runtime.store.get_listing(listing["id"])
    assert record is not None
    return record.calls_used


async def call_status(relay: PrepaidRelay, call_id: str, token: str) -> dict[str, Any]:
    reply = await relay.client.get(f"/v1/calls/{call_id}", headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 200, reply.text
    status: dict[str, Any] = reply.json()
    return status


async def chat(client: openai.AsyncOpenAI, model: str = "sandbox-model") -> Any:
    return await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]


def _usage(completion: Any) -> tuple[int, int]:
    return completion.usage.prompt_tokens, completion.usage.completion_tokens


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


# ---- reserve, capture, release -------------------------------------------------------------------


async def test_call__reserves_max_cost__captures_actual_cost(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    consumer = await relay.consumer(deposit=5 * USDC, allowance=2 * USDC)
    key = await consumer.key()
    raw = await relay.openai(key["key"]).chat.completions.with_raw_response.create(
        model="sandbox-model",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
    )
    completion = raw.parse()
    assert raw.headers["x-quotra-payment"] == "prepaid"
    assert raw.headers["x-quotra-cost"] == str(priced(listing, *_usage(completion)))
    usage = completion.usage
    assert usage is not None and usage.completion_tokens > 0
    cost = priced(listing, usage.prompt_tokens, usage.completion_tokens)

    (charge,) = await charges(relay, consumer.wallet)
    assert raw.headers["quotra-call-id"] == charge.id
    assert (charge.gate, charge.key_id) == ("prepaid", key["id"])
    assert charge.reserved == max_cost(listing)
    assert (charge.state, charge.amount, charge.fee, charge.outcome) == ("captured", cost, None, "ok")
    assert cost < charge.reserved
    assert (charge.model, charge.prompt_tokens, charge.completion_tokens) == (
        "sandbox-model",
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert charge.provider == listing["owner"] and charge.listing_id == listing["id"]
    account = await consumer.account_state()
    assert charge.permission_digest == account.permission_digest is not None
    assert (account.reserved, account.unsettled) == (0, cost)
    state = await consumer.key_state(key["id"])
    assert (state.reserved, state.spent) == (0, cost)
    assert await calls_used(relay, listing) == 1
    # What the payer is told of the call, with its key or its session; nobody else is.
    by_key = await call_status(relay, charge.id, key["key"])
    assert by_key == await call_status(relay, charge.id, consumer.headers["Authorization"].split()[1])
    assert (by_key["state"], by_key["charged"], by_key["amount_atomic"], by_key["reserved_atomic"]) == (
        "captured",
        True,
        cost,
        max_cost(listing),
    )
    other = await relay.consumer()
    refused = await relay.client.get(f"/v1/calls/{charge.id}", headers=other.headers)
    assert (refused.status_code, refused.json()["error"]["code"]) == (404, "call_not_found")
    assert (await relay.client.get(f"/v1/calls/{charge.id}")).status_code == 404


async def test_stream__captures_the_streamed_usage(relay: PrepaidRelay, listing: dict[str, Any]) -> None:
    consumer = await relay.consumer(deposit=5 * USDC, allowance=2 * USDC)
    key = await consumer.key()
    stream = await relay.openai(key["key"]).chat.completions.create(
        model="sandbox-model",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text.startswith("Sandbox reply to:")
    assert usage is not None
    cost = priced(listing, usage.prompt_tokens, usage.completion_tokens)
    (charge,) = await charges(relay, consumer.wallet)
    assert (charge.state, charge.reserved, charge.amount) == ("captured", max_cost(listing), cost)
    assert (charge.stream, charge.prompt_tokens, charge.completion_tokens) == (
        True,
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert (await consumer.account_state()).unsettled == cost


async def test_upstream_failure__released__never_charged(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    consumer = await relay.consumer(deposit=5 * USDC, allowance=2 * USDC)
    key = await consumer.key()
    with pytest.raises(openai.InternalServerError) as failed:
        await chat(relay.openai(key["key"]), f"listing/{listing['id']}/sandbox-error-503")
    assert "nothing was charged" in error_of(failed.value)["message"]
    (charge,) = await charges(relay, consumer.wallet)
    assert failed.value.response.headers["quotra-call-id"] == charge.id
    assert (charge.state, charge.amount, charge.outcome) == ("voided", 0, "upstream_error")
    assert charge.reserved == max_cost(listing)
    account = await consumer.account_state()
    assert (account.reserved, account.unsettled) == (0, 0)
    state = await consumer.key_state(key["id"])
    assert (state.reserved, state.spent) == (0, 0)
    assert await calls_used(relay, listing) == 0
    status = await call_status(relay, charge.id, key["key"])
    assert (status["state"], status["charged"], status["amount_atomic"]) == ("voided", False, 0)


async def test_capture__never_above_the_reservation(relay: PrepaidRelay, listing: dict[str, Any]) -> None:
    consumer = await relay.consumer(deposit=5 * USDC, allowance=2 * USDC)
    key = await consumer.key()
    reservation = await relay.prepaid.reserve(
        await relay.prepaid.authenticate(key["key"]),
        await relay.runtime.store.get_listing(listing["id"]),
        1_500,
        relay.runtime.gate.deadline(),
    )
    assert (reservation.gate, reservation.reserved) == ("prepaid", 1_500)
    assert (reservation.charge(9_999), reservation.charge(1_200), reservation.charge(-5)) == (1_500, 1_200, 0)
    calls = relay.runtime.calls
    served = Served("sandbox-model", False, 10, 20, 5)
    assert await calls.finish(reservation.call_id, amount=reservation.charge(9_999), usage=served)
    (charge,) = await charges(relay, consumer.wallet)
    assert (charge.id, charge.state, charge.reserved, charge.amount) == (
        reservation.call_id,
        "captured",
        1_500,
        1_500,
    )
    assert not await calls.void(reservation.call_id, outcome="error")  # already finished: nothing changes
    assert not await calls.finish(reservation.call_id, amount=1, usage=served)
    assert [(c.state, c.amount) for c in await charges(relay, consumer.wallet)] == [("captured", 1_500)]
    assert (await consumer.account_state()).unsettled == 1_500
    assert (await consumer.key_state(key["id"])).spent == 1_500


# ---- 402 and its advice --------------------------------------------------------------------------


async def test_no_deposit__402_says_how_to_deposit(relay: PrepaidRelay, listing: dict[str, Any]) -> None:
    consumer = await relay.consumer(deposit=0, allowance=2 * USDC)
    key = await consumer.key()
    with pytest.raises(openai.APIStatusError) as refused:
        await chat(relay.openai(key["key"]))
    assert refused.value.status_code == 402
    error = error_of(refused.value)
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_balance")
    assert "Deposit more USDC" in error["message"] and "/v1/account/deposits" in error["message"]
    assert error["prepaid"]["available"] == "0.000000"
    assert "quotra-call-id" not in refused.value.response.headers
    assert await charges(relay, consumer.wallet) == [] and await calls_used(relay, listing) == 0
    assert (await consumer.account_state()).reserved == 0


async def test_deposit_just_short__402__one_unit_more__served(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    needed = max_cost(listing)
    consumer = await relay.consumer(deposit=needed - 1, allowance=2 * USDC)
    client = relay.openai((await consumer.key())["key"])
    with pytest.raises(openai.APIStatusError) as refused:
        await chat(client)
    assert error_of(refused.value)["code"] == "insufficient_balance"
    relay.chain.deposits[consumer.wallet] = needed
    await consumer.get("/v1/account")  # refreshes the mirror from the chain
    assert (await chat(client)).choices


async def test_without_permission__402_says_how_to_sign_one(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    consumer = await relay.consumer(deposit=5 * USDC)
    key = await consumer.key()
    with pytest.raises(openai.APIStatusError) as refused:
        await chat(relay.openai(key["key"]))
    error = error_of(refused.value)
    assert (refused.value.status_code, error["code"]) == (402, "no_spend_permission")
    assert "/v1/account/permission/typed-data" in error["message"]


async def test_permission_used_up__402__a_larger_permission__served(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    consumer = await relay.consumer(deposit=5 * USDC, allowance=max_cost(listing) - 1)
    client = relay.openai((await consumer.key())["key"])
    with pytest.raises(openai.APIStatusError) as refused:
        await chat(client)
    error = error_of(refused.value)
    assert error["code"] == "permission_exhausted" and "higher allowance" in error["message"]
    assert (await consumer.sign_permission(1 * USDC)).status_code == 200
    assert (await chat(client)).choices


async def test_key_cap__reached__402__raised__served(relay: PrepaidRelay, listing: dict[str, Any]) -> None:
    consumer = await relay.consumer(deposit=5 * USDC, allowance=2 * USDC)
    key = await consumer.key(spend_cap=max_cost(listing) + 10)
    client = relay.openai(key["key"])
    await chat(client)  # fits; the capture frees most of the reservation again
    spent = (await consumer.key_state(key["id"])).spent
    assert spent > 0
    with pytest.raises(openai.APIStatusError) as refused:  # the rest is below one reservation
        await chat(client)
    error = error_of(refused.value)
    assert error["code"] == "key_spend_cap_reached" and f"/v1/account/keys/{key['id']}" in error["message"]
    reply = await relay.client.patch(
        f"/v1/account/keys/{key['id']}", json={"spend_cap": "1"}, headers=consumer.headers
    )
    assert reply.status_code == 200 and reply.json()["spend_cap_atomic"] == USDC
    assert (await chat(client)).choices


# ---- keys ----------------------------------------------------------------------------------------


async def test_keys__secret_shown_once__stored_hashed__listed_without_it(relay: PrepaidRelay) -> None:
    consumer = await relay.consumer()
    created = await consumer.key(name="ci", spend_cap=3 * USDC)
    assert created["key"].startswith("sk-quotra-live-") and len(created["key"]) > 50
    assert (created["mode"], created["spend_cap"], created["remaining_atomic"]) == (
        "live",
        "3.000000",
        3 * USDC,
    )
    listed = await consumer.get("/v1/account/keys")
    assert [k["id"] for k in listed["data"]] == [created["id"]]
    assert "key" not in listed["data"][0] and created["key"] not in str(listed)
    async with relay.prepaid.repo.sessions() as session:
        row = await session.get(ApiKeyRecord, created["id"])
    assert row is not None and row.key_hash == hashlib.sha256(created["key"].encode()).hexdigest()


async def test_revoked_key__401_at_once_despite_the_cache(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    consumer = await relay.consumer(deposit=5 * USDC, allowance=2 * USDC)
    key = await consumer.key()
    client = relay.openai(key["key"])
    await chat(client)  # the key is now in the (30 s) cache
    reply = await relay.client.delete(f"/v1/account/keys/{key['id']}", headers=consumer.headers)
    assert reply.status_code == 200 and reply.json()["revoked"] is True
    with pytest.raises(openai.AuthenticationError) as refused:
        await chat(client)
    assert error_of(refused.value)["type"] == "authentication_error"
    assert len(await charges(relay, consumer.wallet)) == 1


async def test_key_revoked_elsewhere__refused_at_reserve(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    """Another replica revoked it: this process still caches the key, the reservation refuses it."""
    consumer = await relay.consumer(deposit=5 * USDC, allowance=2 * USDC)
    key = await consumer.key()
    client = relay.openai(key["key"])
    await chat(client)
    await relay.prepaid.repo.revoke_key(consumer.wallet, key["id"])  # not through the service
    with pytest.raises(openai.AuthenticationError):
        await chat(client)
    with pytest.raises(openai.AuthenticationError):  # and now the cache forgot it too
        await chat(client)


async def test_unknown_key__401_openai_shape(relay: PrepaidRelay, listing: dict[str, Any]) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        await chat(relay.openai("sk-quotra-live-" + "x" * 43))
    error = error_of(refused.value)
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")


async def test_someone_elses_key__cannot_be_revoked_or_changed(relay: PrepaidRelay) -> None:
    owner, other = await relay.consumer(), await relay.consumer()
    key = await owner.key()
    path = f"/v1/account/keys/{key['id']}"
    assert (await relay.client.delete(path, headers=other.headers)).status_code == 404
    assert (await relay.client.patch(path, json={"name": "x"}, headers=other.headers)).status_code == 404
    assert (await relay.client.delete(path)).status_code == 401
    assert not (await owner.key_state(key["id"])).revoked_at


async def test_key_limit_per_wallet(start: Callable[..., Any]) -> None:
    async with start(prepaid_max_keys_per_wallet=2) as relay:
        consumer = await relay.consumer()
        first = await consumer.key()
        await consumer.key()
        reply = await relay.client.post("/v1/account/keys", json={}, headers=consumer.headers)
        assert (reply.status_code, reply.json()["error"]["code"]) == (400, "too_many_keys")
        await relay.client.delete(f"/v1/account/keys/{first['id']}", headers=consumer.headers)
        assert (
            await relay.client.post("/v1/account/keys", json={}, headers=consumer.headers)
        ).status_code == 201


# ---- sandbox keys --------------------------------------------------------------------------------


async def test_sandbox_key__metered_on_sandbox_listings__account_untouched(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    consumer = await relay.consumer()  # no deposit, no permission
    key = await consumer.key(mode="sandbox", spend_cap=max_cost(listing) + 10)
    assert key["key"].startswith("sk-quotra-test-")
    client = relay.openai(key["key"])
    raw = await client.chat.completions.with_raw_response.create(
        model="sandbox-model",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
    )
    usage = raw.parse().usage
    assert raw.headers["x-quotra-payment"] == "sandbox" and usage is not None
    cost = priced(listing, usage.prompt_tokens, usage.completion_tokens)
    (charge,) = await charges(relay, consumer.wallet)
    assert raw.headers["quotra-call-id"] == charge.id
    assert (charge.gate, charge.state, charge.amount, charge.permission_digest, charge.key_id) == (
        "sandbox",
        "settled",
        cost,
        None,
        key["id"],
    )
    assert (await consumer.key_state(key["id"])).spent == cost
    account = await consumer.account_state()
    assert (account.reserved, account.unsettled) == (0, 0)
    # Not money: never handed to the settlement worker, never counted as settled.
    assert await relay.runtime.payments.outbox.charge_backlog() == []
    assert await relay.prepaid.repo.settled_total(consumer.wallet) == 0
    assert (await call_status(relay, charge.id, key["key"]))["gate"] == "sandbox"
    with pytest.raises(openai.APIStatusError) as capped:  # the cap is metered like a live one
        await chat(client)
    assert error_of(capped.value)["code"] == "key_spend_cap_reached"


async def test_sandbox_key__any_listed_model__synthetic_answer_never_upstream(
    start: Callable[..., Any],
) -> None:
    # The live listings' upstreams are fakes that record every call; the sandbox is the real one.
    upstream = FakeUpstream()

    def adapters(kind: str, *, session: Any, base_url: str | None = None) -> Any:
        if kind == "sandbox":
            return get_adapter(kind, session=session)
        return upstream.factory(kind, session=session, base_url=base_url)

    async with start(adapter_factory=adapters, upstream_check_keys=False) as relay:
        live = await relay.provider_listing(
            kind="openai",
            models=["gpt-test", "claude-test"],
            api_key="sk-upstream",
            price_per_call="0.002",
            rate_per_minute=1,  # the sandbox's calls take none of it: the live call below is its first
        )
        consumer = await relay.consumer(deposit=5 * USDC, allowance=2 * USDC)
        key = await consumer.key(mode="sandbox")
        sandbox = relay.openai(key["key"])
        openai_shaped = await chat(sandbox, "gpt-test")
        anthropic_shaped = await chat(sandbox, f"listing/{live['id']}/claude-test")

        assert upstream.calls == [] and upstream.keys_seen == []  # never upstream
        for answer in (openai_shaped, anthropic_shaped):
            assert answer.choices[0].message.content.startswith("Sandbox reply to")
        assert anthropic_shaped.id.startswith("msg_sandbox_")  # synthesized as Anthropic, translated
        # Metered at the listing's price: usage and the key, never the account or the listing.
        rows = await charges(relay, consumer.wallet)
        assert [(c.gate, c.state, c.amount, c.model) for c in rows] == [
            ("sandbox", "settled", 2_000, "gpt-test"),
            ("sandbox", "settled", 2_000, "claude-test"),
        ]
        assert (await consumer.key_state(key["id"])).spent == 4_000
        assert await calls_used(relay, live) == 0
        account = await consumer.account_state()
        assert (account.reserved, account.unsettled) == (0, 0)
        usage = await relay.client.get("/v1/account/usage", headers=consumer.headers)
        assert [u["price_atomic"] for u in usage.json()["data"]] == [2_000, 2_000]
        balance = await relay.client.get("/v1/balance", headers={"Authorization": f"Bearer {key['key']}"})
        meter = balance.json()["key"]
        assert (meter["mode"], meter["spent_atomic"], meter["spent"]) == ("sandbox", 4_000, "0.004000")
        # A live key calls the upstream.
        assert (await chat(relay.openai((await consumer.key())["key"]), "gpt-test")).choices
        assert len(upstream.calls) == 1


# ---- the spend permission ------------------------------------------------------------------------


async def test_permission_typed_data__is_what_a_wallet_signs(relay: PrepaidRelay) -> None:
    consumer = await relay.consumer()
    typed = await consumer.typed_data(3 * USDC, days=7)
    message = typed["message"]
    assert typed["primaryType"] == "SpendPermission"
    assert typed["domain"] == {
        "name": "Quotra Escrow",
        "version": "1",
        "chainId": 84532,
        "verifyingContract": relay.chain.escrow_address,
    }
    assert (message["consumer"], message["spender"], message["allowance"]) == (
        consumer.wallet,
        OPERATOR.address,
        3 * USDC,
    )
    assert abs(message["valid_until"] - (time.time() + 7 * 86_400)) < 120
    assert message["valid_after"] <= time.time()


async def test_permission__registered__becomes_active(relay: PrepaidRelay) -> None:
    consumer = await relay.consumer(deposit=5 * USDC)
    reply = await consumer.sign_permission(2 * USDC)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["permission"]["active"] is True and body["permission"]["allowance_atomic"] == 2 * USDC
    assert (body["remaining_allowance_atomic"], body["available_atomic"]) == (2 * USDC, 2 * USDC)


@pytest.mark.parametrize(
    ("tamper", "code"),
    [
        (lambda m: m.update(spender=to_checksum_address("0x" + "12" * 20)), "wrong_spender"),
        (lambda m: m.update(valid_until=int(time.time()) + 30), "permission_expired"),
        (lambda m: m.update(valid_until=int(time.time()) - 30), "permission_expired"),
        (lambda m: m.update(valid_after=int(time.time()) + 3_600), "permission_not_yet_valid"),
        (lambda m: m.update(consumer=Account.create().address), "wrong_consumer"),
    ],
    ids=["wrong-spender", "expires-too-soon", "expired", "not-yet-valid", "other-consumer"],
)
async def test_permission__refused(relay: PrepaidRelay, tamper: Any, code: str) -> None:
    consumer = await relay.consumer()
    reply = await consumer.sign_permission(USDC, tamper=tamper)
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, code)
    assert (await consumer.get("/v1/account"))["permission"] is None


async def test_permission__bad_signature__refused(relay: PrepaidRelay) -> None:
    consumer = await relay.consumer()
    typed = await consumer.typed_data(USDC)
    stranger = Account.sign_typed_data(Account.create().key, full_message=typed)
    reply = await consumer.register(typed["message"], "0x" + bytes(stranger.signature).hex())
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "invalid_signature")
    own = Account.sign_typed_data(consumer.account.key, full_message=typed)
    altered = {**typed["message"], "allowance": 10 * USDC}  # signed 1 USDC, claims 10
    reply = await consumer.register(altered, "0x" + bytes(own.signature).hex())
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "invalid_signature")
    reply = await consumer.register(typed["message"], "0x" + "ab" * 66)  # longer than the escrow takes
    assert reply.json()["error"]["code"] == "invalid_signature"


async def test_permission__revoked_on_chain__refused__and_revocation_later_stops_calls(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    consumer = await relay.consumer(deposit=5 * USDC)
    typed = await consumer.typed_data(USDC)
    signed_digest = eip712.digest(relay.chain.escrow_domain, "SpendPermission", typed["message"])
    relay.chain.revoked.add((consumer.wallet, signed_digest))
    signature = (
        "0x" + bytes(Account.sign_typed_data(consumer.account.key, full_message=typed).signature).hex()
    )
    reply = await consumer.register(typed["message"], signature)
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "permission_revoked")

    assert (await consumer.sign_permission(USDC)).status_code == 200
    client = relay.openai((await consumer.key())["key"])
    assert (await chat(client)).choices
    active = (await consumer.get("/v1/account"))["permission"]
    relay.chain.revoked.add((consumer.wallet, bytes.fromhex(active["digest"][2:])))
    account = await consumer.get("/v1/account")  # the refresh sees the revocation
    assert account["permission"]["revoked"] is True and account["available_atomic"] == 0
    with pytest.raises(openai.APIStatusError) as refused:
        await chat(client)
    assert error_of(refused.value)["code"] == "no_spend_permission"


async def test_permission__smart_wallet__erc1271(start: Callable[..., Any]) -> None:
    wallet = to_checksum_address("0x" + "5c" * 20)
    seen: list[tuple[str, bytes, bytes]] = []

    async def erc1271(address: str, digest: bytes, signature: bytes) -> bool:
        seen.append((address, digest, signature))
        return address == wallet and signature == b"\x01" * 65

    async with start(erc1271=erc1271) as relay:
        token = relay.runtime.sessions.issue(wallet)[0]
        consumer = Consumer(relay, None, {"Authorization": f"Bearer {token}"})
        typed = await consumer.typed_data(USDC)
        assert (await consumer.register(typed["message"], "0x" + "02" * 65)).status_code == 400
        reply = await consumer.register(typed["message"], "0x" + "01" * 65)
        assert reply.status_code == 200, reply.text
        assert seen[-1][0] == wallet and len(seen[-1][1]) == 32


async def test_permission_endpoints__need_sign_in(relay: PrepaidRelay) -> None:
    for method, path in [
        ("GET", "/v1/account"),
        ("GET", "/v1/account/usage"),
        ("GET", "/v1/account/keys"),
        ("POST", "/v1/account/keys"),
        ("GET", "/v1/account/permission/typed-data?allowance=1"),
    ]:
        reply = await relay.client.request(method, path, json={} if method == "POST" else None)
        assert reply.status_code == 401, path


# ---- the account and its usage -------------------------------------------------------------------


async def test_account__mirror_and_relay_counters(relay: PrepaidRelay, listing: dict[str, Any]) -> None:
    consumer = await relay.consumer(deposit=5 * USDC, allowance=3 * USDC)
    relay.chain.withdrawals[consumer.wallet] = 1 * USDC
    client = relay.openai((await consumer.key())["key"])
    for _ in range(3):
        await chat(client)
    calls = await charges(relay, consumer.wallet)
    captured = sum(c.amount for c in calls)
    digest = (await consumer.account_state()).permission_digest
    assert digest is not None
    # The settlement worker's side: the oldest call goes into a batch that lands on the escrow.
    outbox = relay.runtime.payments.outbox
    assert [d for d, _ in await outbox.charge_backlog()] == [digest]
    batch = await outbox.claim_charge_batch(digest, 1)
    assert batch is not None and (batch.kind, batch.items, batch.amount) == ("charges", 1, calls[0].amount)
    settled = calls[0].amount
    tx_hash = "0x" + "bb" * 32
    fee = settled // 10
    assert await outbox.settle_charges(batch, tx_hash=tx_hash, gas_used=90_000, fee_bps=1_000, total_fee=fee)
    assert not await outbox.settle_charges(
        batch, tx_hash=tx_hash, gas_used=90_000, fee_bps=1_000, total_fee=fee
    )
    # ...and the chain says the same.
    relay.chain.deposits[consumer.wallet] = 5 * USDC - settled
    relay.chain.spent[bytes.fromhex(digest[2:])] = settled

    account = await consumer.get("/v1/account")
    unsettled = captured - settled
    assert account["deposit_atomic"] == 5 * USDC - settled
    assert account["pending_withdrawal_atomic"] == USDC
    assert account["pending_withdrawal_unlocks_at"] == WITHDRAWAL_UNLOCKS_AT
    assert (account["reserved_atomic"], account["unsettled_atomic"]) == (0, unsettled)
    assert account["settled_total_atomic"] == settled
    assert account["permission"]["spent_atomic"] == settled
    assert account["remaining_allowance_atomic"] == 3 * USDC - settled - unsettled
    assert account["available_atomic"] == min(5 * USDC - settled - USDC, 3 * USDC - settled) - unsettled
    assert account["deposit"] == f"{(5 * USDC - settled) / USDC:.6f}"

    first = await consumer.get("/v1/account/usage", limit=2)
    assert [r["id"] for r in first["data"]] == [calls[2].id, calls[1].id] and first["has_more"]
    row = first["data"][0]
    assert (row["object"], row["gate"], row["model"], row["status"]) == (
        "quotra.call",
        "prepaid",
        "sandbox-model",
        "captured",
    )
    assert row["price_atomic"] == calls[2].amount and row["reserved_atomic"] == calls[2].reserved
    assert row["prompt_tokens"] == calls[2].prompt_tokens > 0 and row["settlement_tx"] is None
    assert first["next_before"] == calls[1].id
    second = await consumer.get("/v1/account/usage", limit=2, before=first["next_before"])
    (row,) = second["data"]
    assert (row["id"], row["status"], row["settlement_tx"]) == (calls[0].id, "settled", tx_hash)
    assert second["has_more"] is False and second["next_before"] is None
    status = await call_status(relay, calls[0].id, consumer.headers["Authorization"].split()[1])
    assert (status["state"], status["transaction"], status["fee_atomic"], status["amount_atomic"]) == (
        "settled",
        tx_hash,
        allocate_fees([settled], fee, 1_000)[0],
        settled,
    )


async def test_usage__the_wallets_calls_of_every_gate__newest_first(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    consumer = await relay.consumer(deposit=5 * USDC, allowance=2 * USDC)
    live, sandbox = await consumer.key(), await consumer.key(mode="sandbox")
    await chat(relay.openai(live["key"]))
    await chat(relay.openai(sandbox["key"]))
    free = await relay.client.post(  # signed in, no key: one of the playground's free calls
        "/v1/chat/completions",
        json={"model": "sandbox-model", "messages": MESSAGES, "max_tokens": MAX_TOKENS},
        headers=consumer.headers,
    )
    assert free.status_code == 200 and free.headers["x-quotra-payment"] == "playground"
    await chat(relay.openai((await (await relay.consumer(deposit=USDC, allowance=USDC)).key())["key"]))

    usage = await consumer.get("/v1/account/usage")
    rows = [(r["gate"], r["api_key_id"], r["status"]) for r in usage["data"]]
    assert rows == [
        ("playground", None, "settled"),
        ("sandbox", sandbox["id"], "settled"),
        ("prepaid", live["id"], "captured"),
    ]  # and nobody else's
    assert usage["data"][0]["id"] == free.headers["quotra-call-id"]
    assert usage["data"][0]["price_atomic"] == 0 and usage["has_more"] is False
    bad = await relay.client.get("/v1/account/usage", params={"before": 12}, headers=consumer.headers)
    assert bad.status_code == 400


async def test_account__node_down__stale_values_still_served(relay: PrepaidRelay) -> None:
    consumer = await relay.consumer(deposit=2 * USDC, allowance=USDC)
    relay.chain.withdrawals[consumer.wallet] = USDC
    fresh = await consumer.get("/v1/account")
    assert (fresh["deposit_atomic"], fresh["pending_withdrawal_unlocks_at"]) == (
        2 * USDC,
        WITHDRAWAL_UNLOCKS_AT,
    )
    relay.chain.fail = True
    relay.chain.deposits[consumer.wallet] = 0
    stale = await consumer.get("/v1/account")
    assert (stale["deposit_atomic"], stale["pending_withdrawal_atomic"]) == (2 * USDC, USDC)
    assert stale["pending_withdrawal_unlocks_at"] is None  # not known without the chain


async def test_a_call_that_never_finishes__swept_at_its_deadline__nothing_charged(
    relay: PrepaidRelay, listing: dict[str, Any]
) -> None:
    consumer = await relay.consumer(deposit=5 * USDC, allowance=2 * USDC)
    key = await consumer.key()
    ref = await relay.prepaid.authenticate(key["key"])
    record = await relay.runtime.store.get_listing(listing["id"])
    deadline = relay.runtime.gate.deadline()
    assert timedelta(seconds=890) < deadline - datetime.now(UTC) <= timedelta(seconds=900)  # call_timeout
    reservation = await relay.prepaid.reserve(ref, record, 2_000, deadline)  # its relay then stops
    calls, outbox = relay.runtime.calls, relay.runtime.payments.outbox
    assert await calls.sweep() == 0  # not past its deadline yet
    assert (await consumer.account_state()).reserved == 2_000
    assert (await consumer.key_state(key["id"])).reserved == 2_000
    assert await calls_used(relay, listing) == 1
    later = deadline + timedelta(seconds=1)
    assert [c for c, _, _ in await outbox.stranded(later.timestamp())] == [reservation.call_id]
    assert await calls.sweep(later) == 1
    assert await calls.sweep(later) == 0  # once
    (charge,) = await charges(relay, consumer.wallet)
    assert (charge.id, charge.state, charge.amount, charge.outcome) == (
        reservation.call_id,
        "voided",
        0,
        "error",
    )
    assert charge.error is not None and "never finished" in charge.error
    assert (await consumer.account_state()).reserved == 0
    assert (await consumer.key_state(key["id"])).reserved == 0
    assert await calls_used(relay, listing) == 0
    assert await outbox.stranded(later.timestamp()) == []
    # Served after all (a slow upstream past the deadline): not charged.
    assert not await calls.finish(charge.id, amount=1_000, usage=Served("sandbox-model", False, 1, 1, 1))
    assert (await consumer.account_state()).unsettled == 0
    assert (await consumer.key_state(key["id"])).spent == 0


# ---- concurrency ---------------------------------------------------------------------------------


async def test_200_parallel_calls_near_the_key_cap__never_overspend(start: Callable[..., Any]) -> None:
    upstream = FakeUpstream(delay=0.005)
    async with start(adapter_factory=upstream.factory, consumer_rate_per_minute=100_000) as relay:
        await relay.provider_listing(
            models=["sandbox-model"], price_per_call="0.001", price_output_per_mtok="100"
        )
        consumer = await relay.consumer(deposit=10 * USDC, allowance=10 * USDC)
        cap = 61_500  # reservation 1_000 + 50 * 100 = 6_000 per call; captures ~1_800
        key = await consumer.key(spend_cap=cap)
        client = relay.openai(key["key"])
        done = asyncio.Event()
        samples: list[tuple[int, int, int, int]] = []

        async def watch() -> None:
            while not done.is_set():
                state = await consumer.key_state(key["id"])
                account = await consumer.account_state()
                samples.append((state.spent, state.reserved, account.reserved, account.unsettled))
                await asyncio.sleep(0.002)

        async def one() -> str:
            try:
                await chat(client)
                return "ok"
            except openai.APIStatusError as exc:
                assert exc.status_code == 402, exc.response.text
                return "402"

        watcher = asyncio.create_task(watch())
        results = await asyncio.gather(*(one() for _ in range(200)))
        done.set()
        await watcher

        assert results.count("ok") > 10 and results.count("402") > 0
        assert samples and all(spent + reserved <= cap for spent, reserved, _, _ in samples)
        assert all(reserved + unsettled <= 10 * USDC for _, _, reserved, unsettled in samples)
        rows = await charges(relay, consumer.wallet)
        captured = sum(c.amount for c in rows if c.state == "captured")
        assert len([c for c in rows if c.state == "captured"]) == results.count("ok")
        assert {c.state for c in rows} == {"captured"}  # a refused call leaves no row
        assert await calls_used(relay, {"id": rows[0].listing_id}) == results.count("ok")
        state, account = await consumer.key_state(key["id"]), await consumer.account_state()
        assert captured == state.spent == account.unsettled <= cap
        assert state.reserved == account.reserved == 0
        # Nothing leaked: the rest of the cap can still be used, down to less than one reservation.
        while True:
            try:
                await chat(client)
            except openai.APIStatusError as exc:
                assert error_of(exc)["code"] == "key_spend_cap_reached"
                break
        spent = (await consumer.key_state(key["id"])).spent
        assert cap - 6_000 < spent <= cap
