"""Rate limits kept in the database (`quotra.store.rate_limits`): every replica takes from the same
rows, so two engines on one database admit no more than the limit together; and API keys are
limited per key (default and override) with `RateLimit-*` headers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest
from eth_account import Account
from quotra.store.db import create_engine, upgrade
from quotra.store.rate_limits import take
from quotra.store.transactions import Transactions
from relay_helpers import sign

USDC = 10**6
T0 = 1_800_000_000_000_000  # µs


@pytest.fixture
async def replicas(db_url: str) -> AsyncIterator[tuple[Transactions, Transactions]]:
    """Two replicas' transaction runners (their own engines) on one database."""
    engines = [create_engine(db_url), create_engine(db_url)]
    await upgrade(engines[0])
    runners = [Transactions(e) for e in engines]
    try:
        yield runners[0], runners[1]
    finally:
        for runner, engine in zip(runners, engines, strict=True):
            await runner.close()
            await engine.dispose()


async def test_take__limit_shared_by_replicas__refills_over_the_minute(
    replicas: tuple[Transactions, Transactions],
) -> None:
    a, b = replicas
    decisions = [await (a if i % 2 else b).run(take, "key:k1", 3, T0) for i in range(4)]
    assert [(d.allowed, d.remaining) for d in decisions] == [(True, 2), (True, 1), (True, 0), (False, 0)]
    assert decisions[-1].retry_after == 20 and decisions[-1].limit == 3
    assert decisions[-1].headers()["RateLimit-Policy"] == "3;w=60"
    # One request's interval (20 s) later, one more; another key has its own budget.
    assert not (await a.run(take, "key:k1", 3, T0 + 19_999_999)).allowed
    assert (await b.run(take, "key:k1", 3, T0 + 20_000_000)).allowed
    assert (await a.run(take, "key:k2", 3, T0)).remaining == 2


async def test_api_key__default_and_override__429_with_ratelimit_headers(start: Callable[..., Any]) -> None:
    # The relay's per-consumer limit (in process, 1 a minute here) leaves API keys to their own.
    async with start(key_rate_per_minute=2, consumer_rate_per_minute=1) as relay:
        await relay.provider_listing(models=["sandbox-model"], price_per_call="0.001")
        consumer = await relay.consumer(deposit=5 * USDC, allowance=2 * USDC)
        key = await consumer.key()
        client = relay.openai(key["key"])
        messages: Any = [{"role": "user", "content": "hi"}]
        first = await client.chat.completions.with_raw_response.create(
            model="sandbox-model", messages=messages
        )
        assert (first.headers["ratelimit-limit"], first.headers["ratelimit-remaining"]) == ("2", "1")
        await client.chat.completions.create(model="sandbox-model", messages=messages)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="sandbox-model", messages=messages)
        assert refused.value.response.headers["ratelimit-remaining"] == "0"
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert refused.value.code == "rate_limit_exceeded"
        # Nothing was reserved or charged for the refused call.
        assert (await consumer.account_state()).reserved == 0
        # A key with its own limit.
        other = await consumer.key()
        reply = await relay.client.patch(
            f"/v1/account/keys/{other['id']}", json={"rate_per_minute": 5}, headers=consumer.headers
        )
        assert (reply.status_code, reply.json()["rate_per_minute"]) == (200, 5)
        fresh = relay.openai(other["key"])
        raw = await fresh.chat.completions.with_raw_response.create(model="sandbox-model", messages=messages)
        assert (raw.headers["ratelimit-limit"], raw.headers["ratelimit-remaining"]) == ("5", "4")


async def test_sign_in__limited_per_wallet_and_per_client_address(start: Callable[..., Any]) -> None:
    async with start(signin_rate_per_minute=2, signin_rate_per_minute_ip=10) as relay:

        async def attempt(wallet: Any) -> httpx.Response:
            nonce = await relay.client.post("/v1/auth/nonce", json={"address": wallet.address})
            if nonce.status_code != 201:
                return nonce
            message = nonce.json()["message"]
            return await relay.client.post(
                "/v1/auth/verify", json={"message": message, "signature": sign(wallet, message)}
            )

        wallet, other = Account.create(), Account.create()
        assert [(await attempt(wallet)).status_code for _ in range(2)] == [200, 200]  # 4 of 10
        refused = await attempt(wallet)  # the client's 6th request, the wallet's 3rd sign-in
        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "rate_limit_exceeded")
        assert refused.headers["ratelimit-limit"] == "2" and int(refused.headers["retry-after"]) >= 1
        assert [(await attempt(other)).status_code for _ in range(2)] == [200, 200]  # 10 of 10
        refused = await attempt(other)
        assert (refused.status_code, refused.headers["ratelimit-limit"]) == (429, "10")
