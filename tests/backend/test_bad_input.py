"""Every bad input is a clear 4xx in OpenAI's error shape, and nothing is stored or sent on: bodies
and headers too large, JSON nested past the parser's recursion limit or with numbers out of range,
control characters (PostgreSQL refuses NUL), integers past int64, token counts past what a call may
cost, and changes that set a field to null. On SQLite and PostgreSQL (tools/with-postgres.sh)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from relay_helpers import SANDBOX_KEY, chat_body, listing_body

SANDBOX = {"Authorization": f"Bearer {SANDBOX_KEY}"}
BIG = 2**63  # one past int64
DEEP_ARRAYS = b"[" * 5_000 + b"]" * 5_000
DEEP_OBJECTS = b'{"a": ' * 3_000 + b"1" + b"}" * 3_000


def refused(reply: Any, status: int = 400, code: str | None = None) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert body["error"]["type"] == "invalid_request_error", body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


async def post_raw(relay: Any, path: str, raw: bytes, headers: dict[str, str] | None = None) -> Any:
    return await relay.client.post(
        path, content=raw, headers={"content-type": "application/json", **(headers or {})}
    )


# ---- JSON -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        DEEP_ARRAYS,
        b'{"model": "m", "messages": ' + DEEP_ARRAYS + b"}",
        b'{"model": "m", "messages": [{"role": "user", "content": ' + DEEP_OBJECTS + b"}]}",
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 5_000 + b"}",
        b'{"model": "m", "messages": [{"role": "user", "content": "\xff"}]}',
    ],
    ids=["deep-arrays", "deep-messages", "deep-content", "nan", "infinity", "huge-integer", "not-utf8"],
)
async def test_json_out_of_bounds_is_400_and_nothing_is_called(start_relay, db_url: str, raw: bytes) -> None:
    async with start_relay(database_url=db_url) as relay:
        _, provider = await relay.provider()
        await relay.listing(provider, models=["m"])
        for headers in ({}, SANDBOX):  # anonymous (playground) and with a key
            refused(await post_raw(relay, "/v1/chat/completions", raw, headers), 400, "invalid_json")
        assert relay.upstream.calls == []


async def test_json_bodies_of_every_route_are_bounded(relay) -> None:
    _, provider = await relay.provider()
    paths = (
        "/v1/listings",
        "/v1/account/keys",
        "/v1/account/permission",
        "/v1/auth/verify",
        "/v1/auth/nonce",
    )
    for path in paths:
        refused(await post_raw(relay, path, DEEP_OBJECTS, provider), 400, "invalid_json")


# ---- sign-in ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "replacement"),
    [
        ("URI: ", "URI: http://[::1"),
        ("URI: ", "URI: http://testserver:99999999"),
        ("Chain ID: ", "Chain ID: \u00b2"),
        ("Chain ID: ", "Chain ID: 1" + "0" * 5_000),
        ("Issued At: ", "Issued At: 99999-01-01T00:00:00Z"),
        ("Nonce: ", "Nonce: " + "a" * 7_000),
    ],
    ids=[
        "unclosed-ipv6",
        "port-out-of-range",
        "superscript-digit",
        "huge-chain-id",
        "year-99999",
        "long-nonce",
    ],
)
async def test_a_malformed_sign_in_message_is_401(relay, line: str, replacement: str) -> None:
    account, _ = await relay.provider()
    nonce = await relay.client.post("/v1/auth/nonce", json={"address": account.address})
    lines = nonce.json()["message"].split("\n")
    message = "\n".join(replacement if entry.startswith(line) else entry for entry in lines)
    reply = await relay.client.post(
        "/v1/auth/verify", json={"message": message, "signature": "0x" + "ab" * 65}
    )
    assert reply.status_code == 401, reply.text
    assert reply.json()["error"]["code"] == "invalid_siwe"


# ---- sizes ------------------------------------------------------------------------------------------


async def test_headers_over_the_limit_are_431(start_relay) -> None:
    async with start_relay(max_header_bytes=4_096) as relay:
        reply = await relay.client.post(
            "/v1/chat/completions", json=chat_body(), headers={"x-padding": "a" * 5_000}
        )
        refused(reply, 431, "request_headers_too_large")
        reply = await relay.client.get("/v1/models", headers={"PAYMENT-SIGNATURE": "A" * 5_000})
        refused(reply, 431, "request_headers_too_large")
        assert relay.upstream.calls == []
        assert (await relay.client.get("/v1/models", headers={"x-padding": "a" * 2_000})).status_code == 200


# ---- strings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"models": ["model\x00"]}, "models.0"),
        ({"models": ["model\x1b[31m"]}, "models.0"),
        ({"models": ["model\u0085"]}, "models.0"),
        ({"models": ["m" * 201]}, "models.0"),
        ({"kind": "openai", "api_key": "sk-\x00"}, "api_key"),
        ({"kind": "openai", "api_key": ""}, "api_key"),
        ({"kind": "openai-compatible", "api_key": "sk-1", "base_url": "https://x.test/\x00"}, "base_url"),
    ],
    ids=["nul", "escape", "c1", "too-long", "nul-key", "empty-key", "nul-url"],
)
async def test_control_characters_in_a_listing_are_400_and_nothing_is_stored(
    start_relay, db_url: str, body: dict[str, Any], param: str
) -> None:
    async with start_relay(database_url=db_url) as relay:
        _, provider = await relay.provider()
        error = refused(await relay.client.post("/v1/listings", json=listing_body(**body), headers=provider))
        assert error["param"] == param
        mine = await relay.client.get("/v1/listings/mine", headers=provider)
        assert mine.json()["data"] == []
        # and in a change of an existing listing
        listing = await relay.listing(provider)
        reply = await relay.client.patch(f"/v1/listings/{listing['id']}", json=body, headers=provider)
        assert reply.status_code == 400, reply.text
        stored = await relay.runtime.store.get_listing(listing["id"])
        assert list(stored.models) == ["sandbox-model"] and stored.base_url is None
        assert (
            await relay.client.post("/v1/chat/completions", json=chat_body(), headers=SANDBOX)
        ).status_code == 200


async def test_control_characters_in_queries_and_model_names_are_400(start_relay, db_url: str) -> None:
    async with start_relay(database_url=db_url) as relay:
        refused(await relay.client.get("/v1/listings", params={"model": "m\x00"}), 400)
        reply = await relay.client.post("/v1/chat/completions", json=chat_body("m\x00"), headers=SANDBOX)
        assert refused(reply)["param"] == "model"
        refused(await relay.client.get("/v1/listings/lst_%00"), 400)
        refused(await relay.client.get("/v1/calls/call_%00"), 400)
        assert relay.upstream.calls == []


@pytest.mark.parametrize(
    "change",
    [{"name": "key\x00"}, {"name": "tab\tname"}, {"name": "n" * 101}, {"name": None}],
    ids=["nul", "tab", "too-long", "null"],
)
async def test_api_key_names_are_printable_and_never_null(start_relay, db_url: str, change: dict) -> None:
    async with start_relay(database_url=db_url) as relay:
        _, wallet = await relay.provider()
        if change["name"] is not None:
            reply = await relay.client.post("/v1/account/keys", json=change, headers=wallet)
            assert refused(reply)["param"] == "name"
            assert (await relay.client.get("/v1/account/keys", headers=wallet)).json()["data"] == []
        key = (await relay.client.post("/v1/account/keys", json={"name": "mine"}, headers=wallet)).json()
        reply = await relay.client.patch(f"/v1/account/keys/{key['id']}", json=change, headers=wallet)
        assert refused(reply)["param"] == "name"
        keys = (await relay.client.get("/v1/account/keys", headers=wallet)).json()["data"]
        assert [k["name"] for k in keys] == ["mine"]


async def test_null_for_a_listing_field_that_must_be_set_is_400(relay) -> None:
    _, provider = await relay.provider()
    listing = await relay.listing(provider)
    for field in ("models", "price_per_call", "api_key", "base_url"):
        reply = await relay.client.patch(
            f"/v1/listings/{listing['id']}", json={field: None}, headers=provider
        )
        assert refused(reply)["param"] == field
    stored = await relay.runtime.store.get_listing(listing["id"])
    assert list(stored.models) == ["sandbox-model"] and stored.price_per_call == 1_000


# ---- integers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "param"),
    [
        (f"/v1/provider/claims?offset={BIG}", "offset"),
        (f"/v1/provider/claims?limit={BIG}", "limit"),
        (f"/v1/account/usage?before={BIG}", "before"),
        (f"/v1/account/usage?limit={BIG}", "limit"),
        (f"/v1/listings?offset={BIG}", "offset"),
        (f"/v1/listings?min_remaining_calls={BIG}", "min_remaining_calls"),
        ("/v1/listings?offset=-1", "offset"),
    ],
)
async def test_page_positions_past_int64_are_400(start_relay, db_url: str, path: str, param: str) -> None:
    async with start_relay(database_url=db_url) as relay:
        _, wallet = await relay.provider()
        assert refused(await relay.client.get(path, headers=wallet))["param"] == param


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [BIG, 10**7 + 1, 2**256])
async def test_token_counts_past_what_a_call_may_cost_are_400(
    start_relay, db_url: str, field: str, value: int
) -> None:
    async with start_relay(database_url=db_url) as relay:
        _, provider = await relay.provider()
        # the dearest per-token listing: a call's most is priced before anything is reserved
        listing = await relay.listing(provider, price_input_per_mtok="1000", price_output_per_mtok="1000")
        for headers in ({}, SANDBOX):
            body = chat_body(f"listing/{listing['id']}", **{field: value})
            assert (
                refused(await relay.client.post("/v1/chat/completions", json=body, headers=headers))["param"]
                == field
            )
        stored = await relay.runtime.store.get_listing(listing["id"])
        assert stored.calls_used == 0 and relay.upstream.calls == []
        body = chat_body(f"listing/{listing['id']}", **{field: 10**7})  # the most a call may ask
        assert (
            await relay.client.post("/v1/chat/completions", json=body, headers=SANDBOX)
        ).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"max_calls": BIG},
        {"max_output_tokens": BIG},
        {"rate_per_minute": BIG},
        {"free_calls_per_day": BIG},
        {"free_calls_per_day": -1},
    ],
)
async def test_listing_limits_past_their_bounds_are_400(start_relay, db_url: str, body: dict) -> None:
    async with start_relay(database_url=db_url) as relay:
        _, provider = await relay.provider()
        refused(await relay.client.post("/v1/listings", json=listing_body(**body), headers=provider))
        assert (await relay.client.get("/v1/listings/mine", headers=provider)).json()["data"] == []


# ---- payment headers --------------------------------------------------------------------------------


async def test_a_payment_on_a_relay_without_x402_is_402_not_a_503_to_retry(relay) -> None:
    _, provider = await relay.provider()
    listing = await relay.listing(provider, price_per_call="0.002")
    nested = base64.b64encode(b"[" * 3_000 + b"]" * 3_000).decode()
    for header in (nested, base64.b64encode(b'{"x402Version": 2}').decode(), "%%%"):
        reply = await relay.client.post(
            "/v1/chat/completions",
            json=chat_body(f"listing/{listing['id']}"),
            headers={"PAYMENT-SIGNATURE": header},
        )
        assert reply.status_code == 402, reply.text
        assert "takes no x402 payments" in reply.json()["error"]["message"]
    assert relay.upstream.calls == []
