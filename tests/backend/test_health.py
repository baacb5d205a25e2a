"""Health, readiness (database, chain) and metrics."""

from __future__ import annotations

import json

import httpx
from relay_helpers import chat_body


async def test_healthz(relay) -> None:
    assert (await relay.client.get("/healthz")).json() == {"status": "ok"}


async def test_readyz_reports_database_and_skips_unconfigured_chain(relay) -> None:
    reply = await relay.client.get("/readyz")
    assert reply.status_code == 200
    body = reply.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"] == {"ok": True, "dialect": "sqlite"}
    assert body["checks"]["chain"]["skipped"] is True


def chain(chain_id: int) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        call = json.loads(request.content)
        assert call["method"] == "eth_chainId"
        return httpx.Response(200, json={"jsonrpc": "2.0", "id": call["id"], "result": hex(chain_id)})

    return httpx.MockTransport(answer)


async def test_readyz_checks_the_chain_when_configured(start_relay, make_settings, tmp_path) -> None:
    from contextlib import AsyncExitStack

    from quotra.app import create_app

    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps({"escrow": "0x" + "12" * 20, "usdc": "0x" + "34" * 20}))
    for chain_id, status in [(84532, 200), (1, 503)]:
        app = create_app(
            make_settings(chain_rpc_url="http://chain.test:8545", deployment_file=deployment),
            http_transport=chain(chain_id),
        )
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(app.router.lifespan_context(app))
            client = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
            )
            reply = await client.get("/readyz")
            assert reply.status_code == status, reply.text
            assert reply.json()["checks"]["deployment"]["keys"] == ["escrow", "usdc"]
            assert reply.json()["checks"]["chain"]["ok"] is (status == 200)


async def test_readyz_fails_when_the_chain_is_unreachable(start_relay) -> None:
    async with start_relay(chain_rpc_url="http://127.0.0.1:9/") as relay:
        reply = await relay.client.get("/readyz")
        assert reply.status_code == 503 and reply.json()["checks"]["chain"]["ok"] is False
    async with start_relay(chain_rpc_url="http://127.0.0.1:9/", readyz_check_chain=False) as relay:
        assert (await relay.client.get("/readyz")).status_code == 200


async def test_metrics_count_requests_latency_and_listing_usage(relay) -> None:
    _, headers = await relay.provider()
    listing = await relay.listing(headers)
    await relay.client.post("/v1/chat/completions", json=chat_body())
    await relay.client.get("/v1/nothing")
    reply = await relay.client.get("/metrics")
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.text
    assert 'quotra_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'quotra_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'quotra_http_request_duration_seconds_count{route="/v1/chat/completions"} 1.0' in text
    assert f'quotra_listing_calls_total{{listing="{listing["id"]}",outcome="ok"}} 1.0' in text
    assert f'quotra_listing_tokens_total{{direction="output",listing="{listing["id"]}"}}' in text
