"""Relay overhead over a direct call to the same mock upstream (DESIGN.md section 5).

Starts the local OpenAI-compatible model server (`quotra_dev.localmodel`) and `quotra serve`
as real processes (SQLite in a temporary folder), lists the model server as an
`openai-compatible` listing, then sends the same chat request N times at C concurrent clients,
first straight to the model server, then through the relay, and reports latency percentiles,
their difference (the relay's overhead) and throughput. Calls go through the relay's full call
path (listing choice, limits, the payment gate's playground counter in the database, metering,
the upstream adapter); they are unpaid, so no chain is needed — the payment paths add their own
database writes, measured by the payment tests, not here.

    .venv/bin/python bench/relay_overhead.py [--requests 3000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from eth_account import Account
from eth_account.messages import encode_defunct
from quotra_dev.demo.marketplace import Process, quotra_argv
from quotra_dev.twin import free_port

MODEL = "bench-model"
API_KEY = "sk-bench-upstream"
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    "max_tokens": 16,
}


async def sign_in(client: httpx.AsyncClient) -> dict[str, str]:
    account = Account.create()
    nonce = (await client.post("/v1/auth/nonce", json={"address": account.address})).json()
    signature = Account.sign_message(encode_defunct(text=nonce["message"]), account.key).signature
    reply = await client.post(
        "/v1/auth/verify", json={"message": nonce["message"], "signature": "0x" + signature.hex()}
    )
    reply.raise_for_status()
    return {"Authorization": f"Bearer {reply.json()['access_token']}"}


async def load(
    url: str, headers: dict[str, str], body: dict, requests: int, concurrency: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = iter(range(2 * concurrency))  # warm-up: open the connections first
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                reply = await client.post("/chat/completions", json=body)
                latencies.append(time.perf_counter() - started)
                if reply.status_code != 200:
                    raise RuntimeError(f"{url}: {reply.status_code} {reply.text[:200]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        latencies.clear()
        queue = iter(range(requests))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, elapsed


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


async def main(requests: int, concurrency: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        upstream_port, port = free_port(), free_port()
        upstream = f"http://127.0.0.1:{upstream_port}"
        model_server = Process(
            "localmodel",
            [
                sys.executable,
                "-m",
                "quotra_dev.localmodel",
                "--port",
                str(upstream_port),
                "--api-key",
                API_KEY,
                "--model",
                MODEL,
            ],
            dict(os.environ),
            Path(tmp) / "upstream.log",
        )
        env = {
            **os.environ,
            "QUOTRA_DATA_DIR": tmp,
            "QUOTRA_UPSTREAM_ALLOW_PRIVATE": "true",
            "QUOTRA_PLAYGROUND_FREE_CALLS": str(10**9),
            "QUOTRA_CONSUMER_RATE_PER_MINUTE": str(10**9),
            "QUOTRA_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "QUOTRA_LOG_LEVEL": "WARNING",
        }
        relay = Process(
            "quotra serve", [*quotra_argv(), "serve", "--port", str(port)], env, Path(tmp) / "relay.log"
        )
        try:
            model_server.wait_ready(upstream + "/v1/models")
            relay.wait_ready(f"http://127.0.0.1:{port}/healthz")
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                session = await sign_in(client)
                listing = {
                    "kind": "openai-compatible",
                    "base_url": upstream + "/v1",
                    "api_key": API_KEY,
                    "models": [MODEL],
                    "price_per_call": "0.001",
                }
                (await client.post("/v1/listings", json=listing, headers=session)).raise_for_status()
            direct, direct_s = await load(
                upstream + "/v1", {"Authorization": f"Bearer {API_KEY}"}, BODY, requests, concurrency
            )
            relayed, relayed_s = await load(base + "/v1", session, BODY, requests, concurrency)
        finally:
            relay.stop()
            model_server.stop()
    rows = [
        ("direct to the mock upstream", direct, direct_s),
        ("through the relay", relayed, relayed_s),
    ]
    lines = [
        f"Relay overhead at {concurrency} concurrent clients, {requests} requests each way, "
        f"{os.cpu_count()} cores (client, relay and upstream on the same machine).",
        "",
        "| path | p50 ms | p99 ms | requests/s |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {pct(lat, 50):.2f} | {pct(lat, 99):.2f} | {len(lat) / secs:,.0f} |"
            for name, lat, secs in rows
        ),
        f"| **relay overhead** | **{pct(relayed, 50) - pct(direct, 50):.2f}** | "
        f"**{pct(relayed, 99) - pct(direct, 99):.2f}** | |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "relay_overhead.md"
    )
    args = parser.parse_args()
    text = asyncio.run(main(args.requests, args.concurrency))
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    sys.exit(0)
