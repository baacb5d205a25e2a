"""Health, readiness (the database; the chain and payments as components) and metrics."""

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
    for chain_id, status in [(84532, "ready"), (1, "degraded")]:
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
            # A wrong chain is reported, but the relay still serves (prepaid calls need no chain).
            assert (reply.status_code, reply.json()["status"]) == (200, status), reply.text
            assert reply.json()["checks"]["deployment"]["keys"] == ["escrow", "usdc"]
            assert reply.json()["checks"]["chain"]["ok"] is (status == "ready")
            metrics = (await client.get("/metrics")).text
            assert f'quotra_component_up{{component="chain"}} {1.0 if status == "ready" else 0.0}' in metrics
            assert 'quotra_component_up{component="database"} 1.0' in metrics


async def test_readyz_stays_ready_without_the_chain_and_reports_it(start_relay) -> None:
    async with start_relay(chain_rpc_url="http://127.0.0.1:9/") as relay:
        reply = await relay.client.get("/readyz")
        assert (reply.status_code, reply.json()["status"]) == (200, "degraded")
        assert reply.json()["checks"]["chain"] == {"ok": False, "error": "ConnectError"}
        assert reply.json()["checks"]["database"]["ok"] is True


async def test_readyz_is_unavailable_without_the_database(relay) -> None:
    async def down() -> None:
        raise OSError("database unreachable")

    relay.runtime.store.ping = down
    reply = await relay.client.get("/readyz")
    assert (reply.status_code, reply.json()["status"]) == (503, "unavailable")
    assert reply.json()["checks"]["database"] == {"ok": False, "error": "OSError"}


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


def test_opentelemetry_is_opt_in(make_settings) -> None:
    from quotra.app import create_app

    # FastAPI's native instrumentation looks up OpenTelemetry's providers on every request unless
    # it is switched off; the relay switches it on only when asked.
    default = create_app(make_settings())
    assert not default._native_telemetry.enabled()
    assert {default._telemetry[k] for k in ("tracing", "metrics", "logs")} == {False}
    chosen = create_app(make_settings(opentelemetry=True))
    assert {chosen._telemetry[k] for k in ("tracing", "metrics", "logs")} == {True}
