"""Pieces the three fake apps share: request recording, SSE bodies, deliberate breakage."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import anyio
from quotra.upstream._http import JSON_ERRORS, json_loads
from quotra_dev.localmodel import SSEResponse
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .recorder import RecordedRequest, Recorder


class Abort(Exception):
    """Raised inside a response body: uvicorn then drops the connection mid-body."""


async def read_json(request: Request) -> Any:
    try:
        return json_loads(await request.body())
    except JSON_ERRORS:
        return None


async def record(recorder: Recorder, provider: str, request: Request) -> Any:
    """Record the request and return its JSON body (None when it has none or it is invalid)."""
    body = await read_json(request) if request.method == "POST" else None
    recorder.record_request(
        RecordedRequest(
            provider=provider,
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            client=(request.client.host, request.client.port) if request.client else None,
        )
    )
    return body


async def paced(frames: Iterable[bytes], *, delay: float = 0.0, abort: bool = False) -> AsyncIterator[bytes]:
    for frame in frames:
        if delay:
            await anyio.sleep(delay)
        yield frame
    if abort:
        raise Abort("fake upstream breaks the stream on purpose")


def sse(recorder: Recorder, provider: str, model: str, frames: AsyncIterator[bytes]) -> SSEResponse:
    return SSEResponse(frames, on_close=lambda completed: recorder.record_close(provider, model, completed))


def broken_json(payload: bytes) -> Response:
    """A JSON answer whose connection drops halfway through the body."""
    return StreamingResponse(paced([payload[: len(payload) // 2]], abort=True), media_type="application/json")
