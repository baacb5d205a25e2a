"""The bare pass-through proxy: the floor the relay is measured against (`bench/run.py`).

The relay's own server and HTTP client stack with no payments and no database: uvicorn (same
version and defaults as `quotra serve`: one worker, no access log), FastAPI, and one shared httpx
`AsyncClient` forwarding `POST /v1/chat/completions` to the upstream, streaming when the body asks
for it. Whatever the relay costs above this is the price of its own work.

    .venv/bin/python bench/bareproxy.py --port 9001 --upstream http://127.0.0.1:9000/v1 --api-key sk-...
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse


def create_app(upstream: str, api_key: str) -> FastAPI:
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(base_url=upstream, limits=limits, timeout=60) as client:
            state["client"] = client
            yield

    app = FastAPI(lifespan=lifespan)
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.body()
        client = state["client"]
        if json.loads(body).get("stream"):
            upstream = await client.send(
                client.build_request("POST", "/chat/completions", content=body, headers=headers), stream=True
            )

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in upstream.aiter_raw():
                        yield chunk
                finally:
                    await upstream.aclose()

            return StreamingResponse(
                relay(), status_code=upstream.status_code, media_type="text/event-stream"
            )
        reply = await client.post("/chat/completions", content=body, headers=headers)
        return Response(reply.content, status_code=reply.status_code, media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's OpenAI base URL (…/v1)")
    parser.add_argument("--api-key", default="sk-bench-upstream")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream, args.api_key),
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
