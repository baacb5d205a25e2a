"""Listing CRUD over HTTP: ownership, independence, validation, search; keys never returned."""

from __future__ import annotations

import json
import logging

import pytest
from relay_helpers import chat_body, listing_body

SECRET = "sk-live-PROVIDER-SECRET-0123456789"


async def test_creating_a_listing_needs_a_session(relay) -> None:
    reply = await relay.client.post("/v1/listings", json=listing_body())
    assert reply.status_code == 401
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


async def test_create_and_read_a_listing(relay) -> None:
    account, headers = await relay.provider()
    created = await relay.listing(
        headers,
        kind="openai",
        api_key=SECRET,
        models=["gpt-4o-mini", "gpt-4o"],
        price_per_call="0.0025",
        price_output_per_mtok="0.6",
        max_calls=100,
        max_output_tokens=256,
    )
    assert created["owner"] == account.address
    assert created["price_per_call"] == "0.002500" and created["price_per_call_atomic"] == 2500
    assert created["price_output_per_mtok"] == "0.600000"
    assert created["model"] == f"listing/{created['id']}"
    assert created["remaining_calls"] == 100 and created["status"] == "active"
    public = await relay.client.get(f"/v1/listings/{created['id']}")
    assert public.status_code == 200 and public.json()["models"] == ["gpt-4o-mini", "gpt-4o"]
    assert "base_url" not in public.json()
    assert relay.upstream.keys_seen == [SECRET]  # checked with the upstream on creation


async def test_refused_upstream_key_is_not_listed(relay) -> None:
    _, headers = await relay.provider()
    reply = await relay.client.post(
        "/v1/listings", json=listing_body(kind="openai", api_key="sk-bad"), headers=headers
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_upstream_key"
    assert (await relay.client.get("/v1/listings")).json()["data"] == []


async def test_sandbox_listing_skips_the_key_check(relay) -> None:
    _, headers = await relay.provider()
    await relay.listing(headers, api_key="sk-bad")
    assert relay.upstream.keys_seen == []


async def test_only_the_owner_can_change_a_listing(relay) -> None:
    _, owner = await relay.provider()
    _, stranger = await relay.provider()
    listing = await relay.listing(owner)
    lid = listing["id"]
    for method, path, body in [
        ("PATCH", f"/v1/listings/{lid}", {"price_per_call": "0.5"}),
        ("POST", f"/v1/listings/{lid}/pause", None),
        ("POST", f"/v1/listings/{lid}/resume", None),
        ("DELETE", f"/v1/listings/{lid}", None),
    ]:
        reply = await relay.client.request(method, path, json=body, headers=stranger)
        assert reply.status_code == 403, (method, path)
        assert reply.json()["error"]["type"] == "permission_error"
        anonymous = await relay.client.request(method, path, json=body)
        assert anonymous.status_code == 401
    unchanged = (await relay.client.get(f"/v1/listings/{lid}")).json()
    assert unchanged["price_per_call"] == "0.001000" and unchanged["status"] == "active"
    changed = await relay.client.patch(f"/v1/listings/{lid}", json={"price_per_call": "0.5"}, headers=owner)
    assert changed.status_code == 200 and changed.json()["price_per_call"] == "0.500000"


async def test_pause_and_revoke_one_listing_leaves_the_others_alone(relay) -> None:
    _, headers = await relay.provider()
    a = await relay.listing(headers, models=["m"], price_per_call="0.001")
    b = await relay.listing(headers, models=["m"], price_per_call="0.002")
    c = await relay.listing(headers, models=["m"], price_per_call="0.003")
    assert (await relay.client.post(f"/v1/listings/{a['id']}/pause", headers=headers)).json()[
        "status"
    ] == "paused"
    assert (await relay.client.delete(f"/v1/listings/{b['id']}", headers=headers)).json()[
        "status"
    ] == "revoked"
    live = [item["id"] for item in (await relay.client.get("/v1/listings")).json()["data"]]
    assert live == [c["id"]]
    served = await relay.client.post("/v1/chat/completions", json=chat_body("m"))
    assert served.status_code == 200 and served.headers["x-quotra-listing"] == c["id"]
    paused = await relay.client.post("/v1/chat/completions", json=chat_body(f"listing/{a['id']}"))
    assert paused.status_code == 404 and paused.json()["error"]["code"] == "listing_unavailable"
    revoked = await relay.client.post("/v1/chat/completions", json=chat_body(f"listing/{b['id']}"))
    assert revoked.status_code == 404
    assert (await relay.client.get(f"/v1/listings/{b['id']}")).status_code == 404
    resumed = await relay.client.post(f"/v1/listings/{a['id']}/resume", headers=headers)
    assert resumed.json()["status"] == "active"
    again = await relay.client.post(f"/v1/listings/{b['id']}/resume", headers=headers)
    assert again.status_code == 400 and again.json()["error"]["code"] == "listing_revoked"
    mine = (await relay.client.get("/v1/listings/mine", headers=headers)).json()["data"]
    assert {item["id"]: item["status"] for item in mine} == {
        a["id"]: "active",
        b["id"]: "revoked",
        c["id"]: "active",
    }
    stored = await relay.runtime.store.get_listing(b["id"])
    assert stored.api_key_sealed == ""  # revoked: the key material is gone


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (listing_body(price_per_call="0.00001"), "price_per_call"),
        (listing_body(price_per_call="1.5"), "price_per_call"),
        (listing_body(price_per_call="0.0000001"), "price_per_call"),
        (listing_body(kind="nope"), "kind"),
        (listing_body(models=[]), "models"),
        (listing_body(models=["listing/x"]), "models.0"),
        (listing_body(max_calls=0), "max_calls"),
        (listing_body(expires_at="2001-01-01T00:00:00Z"), "expires_at"),
        (listing_body(kind="openai-compatible", api_key="k"), None),
        (listing_body(kind="openai", api_key=""), None),
        (listing_body(base_url="https://93.184.216.34"), None),
        (listing_body(surprise=True), "surprise"),
    ],
)
async def test_invalid_listings_get_400_in_openai_shape(relay, body: dict, param: str | None) -> None:
    _, headers = await relay.provider()
    reply = await relay.client.post("/v1/listings", json=body, headers=headers)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


async def test_update_validations(relay) -> None:
    _, headers = await relay.provider()
    listing = await relay.listing(headers, max_calls=5)
    lid = listing["id"]
    for _ in range(2):
        assert (
            await relay.client.post("/v1/chat/completions", json=chat_body(f"listing/{lid}"))
        ).status_code == 200
    below = await relay.client.patch(f"/v1/listings/{lid}", json={"max_calls": 1}, headers=headers)
    assert below.status_code == 400 and below.json()["error"]["param"] == "max_calls"
    empty = await relay.client.patch(f"/v1/listings/{lid}", json={}, headers=headers)
    assert empty.status_code == 400
    null_models = await relay.client.patch(f"/v1/listings/{lid}", json={"models": None}, headers=headers)
    assert null_models.status_code == 400
    base = await relay.client.patch(
        f"/v1/listings/{lid}", json={"base_url": "https://93.184.216.34"}, headers=headers
    )
    assert base.status_code == 400
    missing = await relay.client.patch(
        "/v1/listings/lst_0000000000000000", json={"max_calls": 9}, headers=headers
    )
    assert missing.status_code == 404


async def test_search_filters(relay) -> None:
    _, headers = await relay.provider()
    cheap = await relay.listing(headers, models=["a"], price_per_call="0.0001", max_calls=3)
    dear = await relay.listing(headers, models=["a", "b"], price_per_call="0.9")
    search = relay.client.get
    assert [x["id"] for x in (await search("/v1/listings?model=b")).json()["data"]] == [dear["id"]]
    assert [x["id"] for x in (await search("/v1/listings?max_price=0.01")).json()["data"]] == [cheap["id"]]
    assert [x["id"] for x in (await search("/v1/listings?min_remaining_calls=4")).json()["data"]] == [
        dear["id"]
    ]
    assert [x["id"] for x in (await search("/v1/listings?sort=-price")).json()["data"]] == [
        dear["id"],
        cheap["id"],
    ]
    bad = await search("/v1/listings?sort=sideways")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "sort"


async def test_api_key_is_never_returned_nor_logged(relay, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, headers = await relay.provider()
    listing = await relay.listing(headers, kind="openai", api_key=SECRET, models=["gpt-x"])
    lid = listing["id"]
    replacement = SECRET + "-NEW"
    responses = [
        listing,
        (await relay.client.get(f"/v1/listings/{lid}")).json(),
        (await relay.client.get("/v1/listings")).json(),
        (await relay.client.get("/v1/listings/mine", headers=headers)).json(),
        (
            await relay.client.patch(f"/v1/listings/{lid}", json={"api_key": replacement}, headers=headers)
        ).json(),
        (await relay.client.post("/v1/chat/completions", json=chat_body("gpt-x"))).json(),
        (await relay.client.get("/v1/models")).json(),
        (await relay.client.post(f"/v1/listings/{lid}/pause", headers=headers)).json(),
    ]
    from quotra.upstream.base import UpstreamAuthError

    await relay.client.post(f"/v1/listings/{lid}/resume", headers=headers)
    relay.upstream.failures.append(UpstreamAuthError(f"Incorrect API key provided: {replacement}"))
    failed = await relay.client.post("/v1/chat/completions", json=chat_body(f"listing/{lid}"))
    assert failed.status_code == 502
    responses.append(failed.json())
    metrics = (await relay.client.get("/metrics")).text
    dumped = json.dumps(responses) + metrics
    assert SECRET not in dumped and replacement not in dumped
    assert relay.upstream.keys_seen[-1] == replacement  # the upstream did get the key
    logged = "\n".join(
        record.getMessage() + json.dumps(record.__dict__, default=str) for record in caplog.records
    )
    assert caplog.records, "expected log records"
    assert SECRET not in logged and replacement not in logged
    openapi = (await relay.client.get("/openapi.json")).json()
    assert "api_key" not in json.dumps(openapi["components"]["schemas"]["ListingPrivate"])


def test_log_scrubbing_removes_key_shaped_strings() -> None:
    from quotra.logging import JsonFormatter, scrub

    assert "sk-abcdefghijkl" not in scrub("key sk-abcdefghijkl used")
    assert "AIzaSyA1234567890abcdefghijk" not in scrub("gemini AIzaSyA1234567890abcdefghijk")
    assert "tok123456789" not in scrub("Authorization: Bearer tok123456789")
    assert "hunter22" not in scrub('{"api_key": "hunter22"}')
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "calling with %s", ("sk-proj-SECRETSECRET",), None
    )
    line = json.loads(JsonFormatter().format(record))
    assert "SECRETSECRET" not in line["msg"] and line["level"] == "info"
