"""`POST /v1/chat/completions` and `GET /v1/models` over HTTP: shapes, routing, limits, errors."""

from __future__ import annotations

import json

import pytest
from quotra.upstream.base import (
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from relay_helpers import SANDBOX_KEY, chat_body

SANDBOX = {"Authorization": f"Bearer {SANDBOX_KEY}"}


def assert_openai_error(reply, status: int, code: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert "Traceback" not in reply.text
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def sse_events(text: str) -> list:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


async def test_completion_in_openai_shape(relay) -> None:
    _, headers = await relay.provider()
    listing = await relay.listing(headers)
    reply = await relay.client.post("/v1/chat/completions", json=chat_body())
    assert reply.status_code == 200
    body = reply.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    assert reply.headers["x-quotra-listing"] == listing["id"]
    assert reply.headers["x-quotra-payment"] == "playground"
    assert await relay.runtime.store.count_calls(listing["id"], "ok") == 1


async def test_streaming_sends_chunks_then_done_and_usage_only_when_asked(relay) -> None:
    _, headers = await relay.provider()
    listing = await relay.listing(headers)
    reply = await relay.client.post("/v1/chat/completions", json=chat_body(stream=True), headers=SANDBOX)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    # Not asked for: no usage chunk, and every chunk has a choice (`chunk.choices[0]` loops work).
    assert all(e["choices"] and "usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1])
    assert text == "part0 part1 part2 "
    assert await relay.runtime.store.count_calls(listing["id"], "ok") == 1
    assert relay.upstream.stream_closed == 1
    # Asked for: the usage chunk comes last, with no choices, as OpenAI sends it.
    asked = chat_body(stream=True, stream_options={"include_usage": True})
    events = sse_events((await relay.client.post("/v1/chat/completions", json=asked, headers=SANDBOX)).text)
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] > 0
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


async def test_the_openai_sdk_streams_with_the_usual_loop(relay) -> None:
    import openai

    _, headers = await relay.provider()
    await relay.listing(headers)
    sdk = openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=SANDBOX_KEY, max_retries=0, http_client=relay.client
    )
    stream = await sdk.chat.completions.create(
        model="sandbox-model", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "part0 part1 part2 "


async def test_model_routing_picks_the_cheapest_live_listing(relay) -> None:
    _, headers = await relay.provider()
    await relay.listing(headers, models=["m"], price_per_call="0.01")
    cheapest = await relay.listing(headers, models=["m", "other"], price_per_call="0.0001")
    await relay.listing(headers, models=["m"], price_per_call="0.001")
    reply = await relay.client.post("/v1/chat/completions", json=chat_body("m"), headers=SANDBOX)
    assert reply.headers["x-quotra-listing"] == cheapest["id"]
    assert relay.upstream.calls[-1]["model"] == "m"


async def test_exhausted_cheap_listing_falls_through_to_the_next(relay) -> None:
    _, headers = await relay.provider()
    cheap = await relay.listing(headers, models=["m"], price_per_call="0.0001", max_calls=1)
    dear = await relay.listing(headers, models=["m"], price_per_call="0.002")
    first = await relay.client.post("/v1/chat/completions", json=chat_body("m"), headers=SANDBOX)
    second = await relay.client.post("/v1/chat/completions", json=chat_body("m"), headers=SANDBOX)
    assert [first.headers["x-quotra-listing"], second.headers["x-quotra-listing"]] == [
        cheap["id"],
        dear["id"],
    ]
    exhausted = await relay.client.post(
        "/v1/chat/completions", json=chat_body(f"listing/{cheap['id']}"), headers=SANDBOX
    )
    assert_openai_error(exhausted, 429, "listing_quota_exhausted")


async def test_listing_model_names_one_listing_and_optionally_its_model(relay) -> None:
    _, headers = await relay.provider()
    listing = await relay.listing(headers, models=["first", "second"])
    lid = listing["id"]
    await relay.client.post("/v1/chat/completions", json=chat_body(f"listing/{lid}"), headers=SANDBOX)
    await relay.client.post("/v1/chat/completions", json=chat_body(f"listing/{lid}/second"), headers=SANDBOX)
    assert [c["model"] for c in relay.upstream.calls] == ["first", "second"]
    wrong = await relay.client.post(
        "/v1/chat/completions", json=chat_body(f"listing/{lid}/third"), headers=SANDBOX
    )
    assert_openai_error(wrong, 404, "model_not_found")
    assert_openai_error(
        await relay.client.post("/v1/chat/completions", json=chat_body("listing/lst_nope")),
        404,
        "model_not_found",
    )
    assert_openai_error(await relay.client.post("/v1/chat/completions", json=chat_body("listing/")), 400)


async def test_unknown_model_is_404(relay) -> None:
    error = assert_openai_error(
        await relay.client.post("/v1/chat/completions", json=chat_body("nobody-serves-this")),
        404,
        "model_not_found",
    )
    assert error["param"] == "model"


async def test_max_tokens_is_capped_by_the_listing(relay) -> None:
    _, headers = await relay.provider()
    listing = await relay.listing(headers, max_output_tokens=50)
    model = f"listing/{listing['id']}"
    for extra, field, expected in [
        ({}, "max_tokens", 50),
        ({"max_tokens": 10}, "max_tokens", 10),
        ({"max_tokens": 5000}, "max_tokens", 50),
        ({"max_completion_tokens": 900}, "max_completion_tokens", 50),
    ]:
        await relay.client.post("/v1/chat/completions", json=chat_body(model, **extra), headers=SANDBOX)
        assert relay.upstream.calls[-1]["request"][field] == expected


async def test_input_over_the_listing_limit_is_refused_before_the_upstream(relay) -> None:
    _, headers = await relay.provider()
    by_chars = await relay.listing(headers, max_input_chars=20)
    by_tokens = await relay.listing(headers, max_input_tokens=10)
    for listing in (by_chars, by_tokens):
        reply = await relay.client.post(
            "/v1/chat/completions",
            json=chat_body(f"listing/{listing['id']}", content="x" * 200),
            headers=SANDBOX,
        )
        assert_openai_error(reply, 400, "context_length_exceeded")
    assert relay.upstream.calls == []
    for listing in (by_chars, by_tokens):
        assert (await relay.runtime.store.get_listing(listing["id"])).calls_used == 0
    fits = await relay.client.post(
        "/v1/chat/completions", json=chat_body(f"listing/{by_chars['id']}", content="hi")
    )
    assert fits.status_code == 200


async def test_expired_listing_is_not_served(relay) -> None:
    from datetime import UTC, datetime, timedelta

    _, headers = await relay.provider()
    listing = await relay.listing(headers)
    await relay.runtime.store.update_listing(
        listing["id"], expires_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    relay.runtime.cache.invalidate()
    assert_openai_error(
        await relay.client.post("/v1/chat/completions", json=chat_body(f"listing/{listing['id']}")), 404
    )
    assert_openai_error(
        await relay.client.post("/v1/chat/completions", json=chat_body()), 404, "model_not_found"
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": "hi"}, "messages"),
    ],
)
async def test_validation_errors_are_400_in_openai_shape(relay, body: dict, param: str) -> None:
    error = assert_openai_error(await relay.client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


async def test_malformed_json_is_400(relay) -> None:
    reply = await relay.client.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert_openai_error(reply, 400, "invalid_json")


async def test_unknown_path_and_method_are_openai_shaped(relay) -> None:
    assert_openai_error(await relay.client.get("/v1/nothing"), 404)
    assert_openai_error(await relay.client.get("/v1/chat/completions"), 405)


async def test_unknown_api_key_is_401(relay) -> None:
    reply = await relay.client.post(
        "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer sk-who-knows"}
    )
    assert_openai_error(reply, 401, "invalid_api_key")


async def test_body_over_the_limit_is_413_from_content_length(start_relay) -> None:
    async with start_relay(max_body_bytes=2048) as relay:
        reply = await relay.client.post("/v1/chat/completions", json=chat_body(content="x" * 5000))
        assert_openai_error(reply, 413, "request_too_large")


async def test_body_over_the_limit_is_413_while_streaming_in(start_relay) -> None:
    async with start_relay(max_body_bytes=2048) as relay:
        sent = 0

        async def chunks():
            nonlocal sent
            for _ in range(100):
                sent += 1
                yield b" " * 512

        reply = await relay.client.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert_openai_error(reply, 413, "request_too_large")
        assert sent < 100  # refused while reading, not after the whole body arrived


async def test_catch_all_hides_internal_errors(relay, caplog) -> None:
    _, headers = await relay.provider()
    await relay.listing(headers)
    relay.upstream.failures.append(RuntimeError("secret internal detail /etc/quotra"))
    reply = await relay.client.post("/v1/chat/completions", json=chat_body())
    error = assert_openai_error(reply, 500, "internal_error")
    assert "secret internal detail" not in reply.text and error["type"] == "server_error"


# ---- upstream failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (
            UpstreamAuthError("Incorrect API key provided: sk-abc***xyz", provider="openai"),
            502,
            "upstream_auth_failed",
        ),
        (UpstreamRateLimited("slow down", retry_after=7.2), 429, "upstream_rate_limited"),
        (UpstreamUnavailable("boom", status_code=503), 502, "upstream_unavailable"),
        (UpstreamUnavailable("timed out", status_code=504), 502, "upstream_unavailable"),
        (UpstreamBadRequest("max_tokens is too large for this model"), 400, "upstream_bad_request"),
    ],
)
async def test_upstream_errors_map_to_client_errors_and_nothing_is_charged(
    relay, failure, status, code
) -> None:
    _, headers = await relay.provider()
    listing = await relay.listing(headers)
    relay.upstream.failures.append(failure)
    reply = await relay.client.post("/v1/chat/completions", json=chat_body(f"listing/{listing['id']}"))
    error = assert_openai_error(reply, status, code)
    assert "sk-abc" not in reply.text
    if isinstance(failure, UpstreamRateLimited):
        assert reply.headers["retry-after"] == "8"
    if isinstance(failure, UpstreamBadRequest):
        assert "max_tokens is too large" in error["message"]
    stored = await relay.runtime.store.get_listing(listing["id"])
    assert stored.calls_used == 0
    assert await relay.runtime.store.playground_calls(listing["id"], "ip:203.0.113.7") == 0
    metrics = (await relay.client.get("/metrics")).text
    assert f'quotra_upstream_errors_total{{error="{type(failure).__name__}",kind="sandbox"}} 1.0' in metrics


async def test_streaming_upstream_error_before_first_chunk_is_a_real_http_error(relay) -> None:
    _, headers = await relay.provider()
    await relay.listing(headers)
    relay.upstream.failures.append(UpstreamUnavailable("down"))
    reply = await relay.client.post("/v1/chat/completions", json=chat_body(stream=True), headers=SANDBOX)
    assert_openai_error(reply, 502, "upstream_unavailable")


async def test_repeated_key_refusals_put_the_listing_in_cooldown(start_relay) -> None:
    async with start_relay(cooldown_after_failures=2, cooldown_seconds=300) as relay:
        _, headers = await relay.provider()
        listing = await relay.listing(headers)
        model = f"listing/{listing['id']}"
        relay.upstream.failures += [UpstreamAuthError("no"), UpstreamRateLimited("no")]
        for _ in range(2):
            assert (
                await relay.client.post("/v1/chat/completions", json=chat_body(model), headers=SANDBOX)
            ).status_code >= 429
        cooling = await relay.client.post("/v1/chat/completions", json=chat_body(model), headers=SANDBOX)
        assert_openai_error(cooling, 429, "listing_cooldown")
        assert int(cooling.headers["retry-after"]) > 200
        assert len(relay.upstream.calls) == 2  # the third call never reached the upstream
        public = (await relay.client.get(f"/v1/listings/{listing['id']}")).json()
        assert public["healthy"] is False


async def test_routed_call_fails_over_to_the_next_listing(relay) -> None:
    _, headers = await relay.provider()
    cheap = await relay.listing(headers, models=["m"], price_per_call="0.0001")
    other = await relay.listing(headers, models=["m"], price_per_call="0.0002")
    relay.upstream.failures.append(UpstreamUnavailable("down"))
    reply = await relay.client.post("/v1/chat/completions", json=chat_body("m"))
    assert reply.status_code == 200 and reply.headers["x-quotra-listing"] == other["id"]
    assert (await relay.runtime.store.get_listing(cheap["id"])).calls_used == 0
    assert await relay.runtime.store.playground_calls(cheap["id"], "ip:203.0.113.7") == 0


# ---- models ---------------------------------------------------------------------------------------


async def test_models_lists_what_live_listings_serve(relay) -> None:
    _, headers = await relay.provider()
    await relay.listing(headers, models=["b-model", "a-model"], price_per_call="0.002")
    await relay.listing(headers, models=["a-model"], price_per_call="0.001")
    paused = await relay.listing(headers, models=["hidden"], active=False)
    assert paused["status"] == "paused"
    body = (await relay.client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["a-model", "b-model"]
    a = body["data"][0]
    assert a["object"] == "model" and a["listings"] == 2 and a["min_price_per_call"] == "0.001000"
