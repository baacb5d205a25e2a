"""The bare pass-through proxy: the floor the relay is measured against (`bench/run.py`).

The relay's own server and HTTP client stack with no payments and no database: uvicorn (same
version and settings as `quotra serve`: uvloop, httptools, one worker, no access log), FastAPI,
and one shared aiohttp `ClientSession` made like the relay's upstream session
(`quotra.upstream.create_session`) forwarding `POST /v1/chat/completions` to the upstream,
streaming when the body asks for it.
Whatever the relay costs above this is the price of its own work.

    .venv/bin/python bench/bareproxy.py --port 9001 --upstream http://127.0.0.1:9000/v1 --api-key sk-...
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from quotra.netguard import NetGuard
from quotra.upstream import create_session


def create_app(upstream: str, api_key: str) -> FastAPI:
    state: dict[str, aiohttp.ClientSession] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The relay's default upstream timeout; the mock listens on loopback.
        async with create_session(timeout=60, guard=NetGuard(allow_private=True)) as session:
            state["session"] = session
            yield

    app = FastAPI(lifespan=lifespan)
    url = upstream + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.body()
        session = state["session"]
        if json.loads(body).get("stream"):
            upstream = await session.post(url, data=body, headers=headers, allow_redirects=False)

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in upstream.content.iter_any():
                        yield chunk
                finally:
                    upstream.release()

            return StreamingResponse(relay(), status_code=upstream.status, media_type="text/event-stream")
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as reply:
            content = await reply.read()
        return Response(content, status_code=reply.status, media_type="application/json")

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
        loop="uvloop",
        http="httptools",
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
