"""A tiny OpenAI-compatible model server: deterministic sandbox replies in OpenAI's wire format
(`POST /v1/chat/completions`, streaming included, and `GET /v1/models`) behind a Bearer key.

It is the "real-format upstream on this machine" for the demo and for tests: an
`openai-compatible` listing can point at it and go through real HTTP end to end.

    python -m quotra_dev.localmodel --port 9100 --api-key sk-local-demo

From Python, `run_in_thread(create_app(api_key=...))` serves it on a free port and yields the
base URL; the test fakes build on the pieces below rather than copying them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import anyio
import uvicorn
from quotra.upstream._http import JSON_ERRORS, json_dumps, json_loads, now
from quotra.upstream.base import UpstreamBadRequest
from quotra.upstream.sandbox import openai_reply, openai_reply_chunks
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "DEFAULT_MODELS",
    "SSEResponse",
    "chat_completions",
    "check_bearer",
    "create_app",
    "json_response",
    "list_models",
    "main",
    "openai_error",
    "run_in_thread",
]

DEFAULT_MODELS: tuple[str, ...] = ("quotra-local-1",)
OnStreamClose = Callable[[bool], None]


def json_response(payload: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_dumps(payload), status_code, headers, media_type="application/json")


def openai_error(
    status_code: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""
    error = {"message": message, "type": type, "param": param, "code": code}
    return json_response({"error": error}, status_code, headers)


def _masked(key: str) -> str:
    return key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else "*" * len(key)


def check_bearer(request: Request, api_key: str | None) -> Response | None:
    """None when the request may pass; otherwise the 401 OpenAI would send."""
    if not api_key:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return openai_error(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    if token != api_key:
        return openai_error(
            401,
            f"Incorrect API key provided: {_masked(token)}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )
    return None


class SSEResponse(Response):
    """Streams pre-framed SSE bytes; stops (and closes the source) when the client disconnects.

    `on_close(completed)` runs once at the end; `completed` is false when the client left or the
    source failed.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        status_code: int = 200,
        on_close: OnStreamClose | None = None,
    ) -> None:
        self.frames = frames
        self.on_close = on_close
        self.status_code = status_code
        self.background = None
        self.init_headers({"cache-control": "no-cache", "content-type": "text/event-stream; charset=utf-8"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completed = False
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async with anyio.create_task_group() as group:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(watch_disconnect)
                async for frame in self.frames:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                completed = True
                group.cancel_scope.cancel()
        finally:
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
            if self.on_close is not None:
                self.on_close(completed)


async def sse_frames(chunks: Sequence[dict[str, Any]], delay: float = 0.0) -> AsyncIterator[bytes]:
    """OpenAI's framing: `data: <json>` + blank line per chunk, then `data: [DONE]`."""
    for chunk in chunks:
        if delay:
            await anyio.sleep(delay)
        yield b"data: " + json_dumps(chunk) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def chat_completions(
    request: Request,
    *,
    api_key: str | None,
    models: Sequence[str] | None = DEFAULT_MODELS,
    chunk_delay: float = 0.0,
    on_stream_close: OnStreamClose | None = None,
) -> Response:
    """`POST /v1/chat/completions`. `models=None` serves any model name."""
    denied = check_bearer(request, api_key)
    if denied is not None:
        return denied
    try:
        body = json_loads(await request.body())
    except JSON_ERRORS:
        body = None
    if not isinstance(body, dict):
        return openai_error(400, "We could not parse the JSON body of your request.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return openai_error(400, "you must provide a model parameter", param="model")
    if models is not None and model not in models:
        return openai_error(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    try:
        if not body.get("stream"):
            return json_response(openai_reply(body, model).body)
        chunks = openai_reply_chunks(body, model)
    except UpstreamBadRequest:
        return openai_error(400, "'messages' must be a non-empty array.", param="messages")
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        # As OpenAI does: every chunk carries `usage: null` except the final usage chunk.
        for chunk in chunks[:-1]:
            chunk["usage"] = None
    else:
        chunks = chunks[:-1]
    return SSEResponse(sse_frames(chunks, chunk_delay), on_close=on_stream_close)


async def list_models(request: Request, *, api_key: str | None, models: Sequence[str]) -> Response:
    """`GET /v1/models`."""
    denied = check_bearer(request, api_key)
    if denied is not None:
        return denied
    created = now()
    data = [{"id": model, "object": "model", "created": created, "owned_by": "quotra"} for model in models]
    return json_response({"object": "list", "data": data})


def create_app(
    *,
    api_key: str | None = None,
    models: Sequence[str] | None = DEFAULT_MODELS,
    chunk_delay: float = 0.0,
) -> Starlette:
    """The model server. `api_key=None` accepts any caller; `models=None` serves any model name
    (and lists `DEFAULT_MODELS`); `chunk_delay` paces streamed chunks (seconds)."""
    listed = tuple(models) if models is not None else DEFAULT_MODELS

    async def completions_endpoint(request: Request) -> Response:
        return await chat_completions(request, api_key=api_key, models=models, chunk_delay=chunk_delay)

    async def models_endpoint(request: Request) -> Response:
        return await list_models(request, api_key=api_key, models=listed)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", completions_endpoint, methods=["POST"]),
            Route("/v1/models", models_endpoint, methods=["GET"]),
        ]
    )


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def _listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


@contextlib.contextmanager
def run_in_thread(
    *apps: ASGIApp, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 10.0
) -> Iterator[list[str]]:
    """Serve each ASGI app with uvicorn on its own port, from one background thread with its own
    event loop, and yield their base URLs (`http://127.0.0.1:<port>`). Works inside and outside
    pytest and any running event loop. `port` applies when a single app is given."""
    sockets = [_listening_socket(host, port if len(apps) == 1 else 0) for _ in apps]
    servers = [
        uvicorn.Server(
            uvicorn.Config(
                app,
                http="h11",
                ws="none",
                lifespan="off",
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=1,
            )
        )
        for app in apps
    ]
    ready = threading.Event()
    failures: list[BaseException] = []

    async def serve_all() -> None:
        tasks = [
            asyncio.create_task(s.serve(sockets=[sock])) for s, sock in zip(servers, sockets, strict=True)
        ]
        while True:  # uvicorn exposes `started` as a flag only
            if all(s.started for s in servers) or any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.005)
        ready.set()
        await asyncio.gather(*tasks)

    def thread_main() -> None:
        try:
            asyncio.run(serve_all())
        except BaseException as exc:  # reported to the caller below
            failures.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=thread_main, name="quotra-localmodel", daemon=True)
    thread.start()
    try:
        if not ready.wait(startup_timeout) or failures or not all(s.started for s in servers):
            raise RuntimeError(f"local servers failed to start: {failures!r}")
        yield [f"http://{host}:{sock.getsockname()[1]}" for sock in sockets]
    finally:
        for server in servers:
            server.should_exit = True
        thread.join(timeout=10)
        for sock in sockets:
            sock.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quotra_dev.localmodel", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--api-key", default=None, help="Bearer key to require (default: none)")
    parser.add_argument("--model", action="append", dest="models", help="model id to serve (repeatable)")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed chunks")
    args = parser.parse_args(argv)
    app = create_app(api_key=args.api_key, models=args.models or DEFAULT_MODELS, chunk_delay=args.chunk_delay)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False)


if __name__ == "__main__":
    main()
