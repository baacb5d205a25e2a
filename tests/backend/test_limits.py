"""Quotas under concurrency, the playground allowance, and rate limits (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

import pytest
from relay_helpers import SANDBOX_KEY, chat_body

SANDBOX = {"Authorization": f"Bearer {SANDBOX_KEY}"}


async def test_parallel_calls_never_exceed_max_calls(start_relay, db_url: str) -> None:
    async with start_relay(database_url=db_url, consumer_rate_per_minute=10_000) as relay:
        relay.upstream.delay = 0.01  # keep calls in flight together
        _, headers = await relay.provider()
        listing = await relay.listing(headers, max_calls=10)
        replies = await asyncio.gather(
            *(
                relay.client.post(
                    "/v1/chat/completions", json=chat_body(f"listing/{listing['id']}"), headers=SANDBOX
                )
                for _ in range(40)
            )
        )
        statuses = sorted(r.status_code for r in replies)
        assert statuses.count(200) == 10 and statuses.count(429) == 30, statuses
        assert {r.json()["error"]["code"] for r in replies if r.status_code == 429} == {
            "listing_quota_exhausted"
        }
        assert len(relay.upstream.calls) == 10
        stored = await relay.runtime.store.get_listing(listing["id"])
        assert stored.calls_used == 10
        assert await relay.runtime.store.count_calls(listing["id"], "ok") == 10


async def test_playground_gives_three_free_calls_then_402(start_relay, db_url: str) -> None:
    async with start_relay(database_url=db_url) as relay:
        _, headers = await relay.provider()
        listing = await relay.listing(headers, price_per_call="0.004")
        other = await relay.listing(headers, models=["other-model"])
        model = f"listing/{listing['id']}"
        replies = await asyncio.gather(
            *(relay.client.post("/v1/chat/completions", json=chat_body(model)) for _ in range(5))
        )
        assert sorted(r.status_code for r in replies) == [200, 200, 200, 402, 402]
        refused = next(r for r in replies if r.status_code == 402).json()["error"]
        assert refused["type"] == "payment_required" and refused["code"] == "payment_required"
        assert "x402" in refused["message"] and "0.004000 USDC" in refused["message"]
        assert (
            refused["payment"]["listing"] == listing["id"]
            and refused["payment"]["price_per_call"] == "0.004000"
        )
        # each listing has its own allowance
        assert (
            await relay.client.post("/v1/chat/completions", json=chat_body("other-model"))
        ).status_code == 200
        assert await relay.runtime.store.playground_calls(other["id"], "ip:203.0.113.7") == 1
        assert len(relay.upstream.calls) == 4


async def test_playground_counts_per_consumer(start_relay) -> None:
    async with start_relay() as relay:
        account, headers = await relay.provider()
        listing = await relay.listing(headers)
        model = f"listing/{listing['id']}"
        for _ in range(3):
            assert (await relay.client.post("/v1/chat/completions", json=chat_body(model))).status_code == 200
        assert (await relay.client.post("/v1/chat/completions", json=chat_body(model))).status_code == 402
        # the signed-in wallet is a different consumer than this client address
        signed_in = await relay.client.post("/v1/chat/completions", json=chat_body(model), headers=headers)
        assert signed_in.status_code == 200
        wallet = f"wallet:{account.address.lower()}"
        assert await relay.runtime.store.playground_calls(listing["id"], wallet) == 1
    async with start_relay(client_ip="198.51.100.9") as other_ip:
        _, headers = await other_ip.provider()
        second = await other_ip.listing(headers)
        assert (
            await other_ip.client.post("/v1/chat/completions", json=chat_body(f"listing/{second['id']}"))
        ).status_code == 200


async def test_fresh_wallets_share_the_listings_free_calls_a_day(start_relay, db_url: str) -> None:
    # Signing in with a new wallet costs nothing: the listing's daily budget bounds what all of them
    # get, and the listing shows what is left.
    async with start_relay(database_url=db_url, playground_free_calls_per_day=4) as relay:
        _, headers = await relay.provider()
        listing = await relay.listing(headers)
        own = await relay.listing(headers, models=["own-model"], free_calls_per_day=1)
        closed = await relay.listing(headers, models=["closed-model"], free_calls_per_day=0)
        view = (await relay.client.get(f"/v1/listings/{listing['id']}")).json()
        assert (view["free_calls_per_day"], view["free_calls_left_today"]) == (4, 4)
        replies = []
        for _ in range(6):
            _, wallet = await relay.provider()
            body = chat_body(f"listing/{listing['id']}")
            replies.append(await relay.client.post("/v1/chat/completions", json=body, headers=wallet))
        assert [r.status_code for r in replies] == [200, 200, 200, 200, 402, 402]
        error = replies[-1].json()["error"]
        assert "gives 4 free calls a day" in error["message"] and error["payment"]["free_calls_per_day"] == 4
        view = (await relay.client.get(f"/v1/listings/{listing['id']}")).json()
        assert view["free_calls_left_today"] == 0
        assert len(relay.upstream.calls) == 4

        for model, allowed in ((f"listing/{own['id']}", 1), (f"listing/{closed['id']}", 0)):
            statuses = []
            for _ in range(2):
                _, wallet = await relay.provider()
                reply = await relay.client.post("/v1/chat/completions", json=chat_body(model), headers=wallet)
                statuses.append(reply.status_code)
            assert statuses == [200] * allowed + [402] * (2 - allowed)
        views = [(await relay.client.get(f"/v1/listings/{lid}")).json() for lid in (own["id"], closed["id"])]
        assert [(v["free_calls_per_day"], v["free_calls_left_today"]) for v in views] == [(1, 0), (0, 0)]
        # the provider changes the budget: the day's count stands
        reply = await relay.client.patch(
            f"/v1/listings/{own['id']}", json={"free_calls_per_day": 3}, headers=headers
        )
        assert (reply.json()["free_calls_per_day"], reply.json()["free_calls_left_today"]) == (3, 2)


async def test_sandbox_key_only_pays_for_sandbox_listings(relay) -> None:
    _, headers = await relay.provider()
    real = await relay.listing(headers, kind="openai", api_key="sk-good", models=["gpt"])
    reply = await relay.client.post(
        "/v1/chat/completions", json=chat_body(f"listing/{real['id']}"), headers=SANDBOX
    )
    assert reply.status_code == 402 and "Sandbox API keys" in reply.json()["error"]["message"]
    sandbox = await relay.listing(headers)
    for _ in range(5):  # no playground allowance applies to sandbox keys
        ok = await relay.client.post(
            "/v1/chat/completions", json=chat_body(f"listing/{sandbox['id']}"), headers=SANDBOX
        )
        assert ok.status_code == 200 and ok.headers["x-quotra-payment"] == "sandbox"
    assert (await relay.runtime.store.get_listing(sandbox["id"])).calls_used == 5  # metered as for real


async def test_consumer_rate_limit_has_headers(start_relay) -> None:
    async with start_relay(consumer_rate_per_minute=3) as relay:
        _, headers = await relay.provider()
        listing = await relay.listing(headers)
        model = f"listing/{listing['id']}"
        replies = [
            await relay.client.post("/v1/chat/completions", json=chat_body(model), headers=SANDBOX)
            for _ in range(4)
        ]
        assert [r.status_code for r in replies] == [200, 200, 200, 429]
        assert (
            replies[0].headers["ratelimit-limit"] == "3" and replies[0].headers["ratelimit-remaining"] == "2"
        )
        limited = replies[-1]
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert int(limited.headers["retry-after"]) >= 1
        assert (
            limited.headers["ratelimit-remaining"] == "0" and limited.headers["ratelimit-policy"] == "3;w=60"
        )
        assert "limit=3" in limited.headers["ratelimit"]
        # another consumer has its own bucket
        assert (await relay.client.post("/v1/chat/completions", json=chat_body(model))).status_code == 200


async def test_listing_rate_limit_applies_to_every_consumer(start_relay) -> None:
    async with start_relay() as relay:
        _, headers = await relay.provider()
        listing = await relay.listing(headers, rate_per_minute=2)
        model = f"listing/{listing['id']}"
        statuses = [
            (await relay.client.post("/v1/chat/completions", json=chat_body(model), headers=h)).status_code
            for h in (SANDBOX, {}, SANDBOX)
        ]
        assert statuses == [200, 200, 429]
        limited = await relay.client.post("/v1/chat/completions", json=chat_body(model))
        assert limited.status_code == 429 and "retry-after" in limited.headers
        assert f"listing {listing['id']}" in limited.json()["error"]["message"]
        assert await relay.runtime.store.playground_calls(listing["id"], "ip:203.0.113.7") == 1  # not counted


def test_token_bucket_refills_over_time() -> None:
    from quotra.ratelimit import TokenBucketLimiter

    now = [0.0]
    limiter = TokenBucketLimiter(clock=lambda: now[0])
    assert [limiter.hit("k", 60).allowed for _ in range(61)].count(True) == 60
    assert limiter.hit("k", 60).retry_after == 1
    now[0] += 1.0
    assert limiter.hit("k", 60).allowed
    assert not limiter.hit("k", 60).allowed


# ---- X-Forwarded-For: the client is the address the trusted proxy saw --------------------------------


async def free_call(relay, model: str, forwarded: str | None) -> int:
    headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
    reply = await relay.client.post("/v1/chat/completions", json=chat_body(model), headers=headers)
    return reply.status_code


async def test_spoofed_forwarded_for_entries_get_no_more_free_calls(start_relay) -> None:
    async with start_relay(client_ip="10.0.0.1", trust_forwarded_for=True) as relay:
        _, headers = await relay.provider()
        listing = await relay.listing(headers)
        model = f"listing/{listing['id']}"
        # The client writes the left end; the proxy (one hop) appends the address it saw.
        statuses = [await free_call(relay, model, f"192.0.2.{n}, 198.51.100.7") for n in range(10)]
        assert statuses == [200, 200, 200] + [402] * 7
        assert await relay.runtime.store.playground_calls(listing["id"], "ip:198.51.100.7") == 3
        assert await relay.runtime.store.playground_calls(listing["id"], "ip:192.0.2.0") == 0


@pytest.mark.parametrize(
    ("hops", "forwarded", "consumer"),
    [
        (1, "198.51.100.7", "ip:198.51.100.7"),
        (1, "192.0.2.1,198.51.100.7", "ip:198.51.100.7"),
        (2, "192.0.2.1, 198.51.100.7, 10.0.0.2", "ip:198.51.100.7"),
        (1, "2001:db8::1", "ip:2001:db8::1"),
        (2, "198.51.100.7", "ip:10.0.0.1"),  # fewer entries than proxies: not trusted
        (1, "", "ip:10.0.0.1"),
        (1, "192.0.2.1, unknown", "ip:10.0.0.1"),  # not an address: not trusted
        (1, "192.0.2.1, 198.51.100.7:4711", "ip:10.0.0.1"),
        (1, None, "ip:10.0.0.1"),
    ],
)
async def test_the_client_is_counted_from_the_right_of_forwarded_for(
    start_relay, hops: int, forwarded: str | None, consumer: str
) -> None:
    async with start_relay(client_ip="10.0.0.1", trust_forwarded_for=True, trusted_proxy_hops=hops) as relay:
        _, headers = await relay.provider()
        listing = await relay.listing(headers)
        assert await free_call(relay, f"listing/{listing['id']}", forwarded) == 200
        assert await relay.runtime.store.playground_calls(listing["id"], consumer) == 1


async def test_forwarded_for_is_ignored_unless_trusted(start_relay) -> None:
    async with start_relay(client_ip="10.0.0.1") as relay:
        _, headers = await relay.provider()
        listing = await relay.listing(headers)
        assert await free_call(relay, f"listing/{listing['id']}", "198.51.100.7") == 200
        assert await relay.runtime.store.playground_calls(listing["id"], "ip:10.0.0.1") == 1
