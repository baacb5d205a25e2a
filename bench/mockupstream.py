"""A minimal, very fast mock OpenAI upstream for the relay benchmark (`bench/run.py`).

One asyncio process (uvloop when installed) speaking just enough HTTP/1.1 by hand, with keep-alive:
`POST /v1/chat/completions` answers a fixed `chat.completion` with usage, or, when the body asks
for `"stream": true`, a fixed SSE stream (a role chunk, N content chunks, the finish chunk, a usage
chunk and `[DONE]`, chunked transfer encoding, optionally `--chunk-delay-ms` apart);
`GET /v1/models` lists the model (the relay checks a provider key with it). No JSON is parsed:
everything but the streamed chunks is built once at start, so the mock costs a few microseconds per
request and is never the limit of what is measured (`run.py` reports its own requests/s under wrk).

    python bench/mockupstream.py --port 9000 [--model bench-model] [--chunks 8] [--chunk-delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from typing import Final

MAX_HEADER: Final = 64 * 1024
COMPLETION_TEXT: Final = "Hello from the benchmark's mock upstream."


def _response(status: str, content_type: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
        "connection: keep-alive\r\n\r\n"
    ).encode() + body


class Payloads:
    """Every byte the mock sends, built once."""

    def __init__(self, model: str, chunks: int) -> None:
        created = int(time.time())
        completion = {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": COMPLETION_TEXT},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
        }
        self.completion = _response(
            "200 OK", "application/json", json.dumps(completion, separators=(",", ":")).encode()
        )
        models = {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "bench"}]}
        self.models = _response("200 OK", "application/json", json.dumps(models).encode())
        self.not_found = _response("404 Not Found", "application/json", b'{"error":{"message":"not found"}}')
        self.stream_head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n"
        )

        def chunk(delta: dict[str, object], finish: str | None = None, usage: bool = False) -> bytes:
            event: dict[str, object] = {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage:
                event["usage"] = {
                    "prompt_tokens": 12,
                    "completion_tokens": chunks,
                    "total_tokens": 12 + chunks,
                }
            data = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        words = [f"word{i} " for i in range(chunks)]
        self.stream_first = chunk({"role": "assistant", "content": ""}) + chunk({"content": words[0]})
        self.stream_rest = [chunk({"content": w}) for w in words[1:]]
        tail = chunk({}, finish="stop")
        self.stream_tail_usage = tail + chunk({}, usage=True)
        self.stream_tail = tail
        done = b"data: [DONE]\n\n"
        self.stream_done = f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n"


class MockProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive by hand: requests are read by Content-Length (no chunked uploads)."""

    def __init__(self, payloads: Payloads, delay: float) -> None:
        self.p = payloads
        self.delay = delay
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.streaming:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEADER and self.transport is not None:
                    self.transport.close()
                return
            head = bytes(self.buffer[:end])
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : stop if stop >= 0 else None].strip() or b"0")
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            self.handle(head, body)

    def handle(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        line = head.split(b"\r\n", 1)[0]
        if line.startswith(b"POST ") and b"/chat/completions" in line:
            compact = body.replace(b" ", b"")
            if b'"stream":true' in compact:
                self.stream(b'"include_usage":true' in compact)
            else:
                self.transport.write(self.p.completion)
        elif line.startswith(b"GET ") and b"/models" in line:
            self.transport.write(self.p.models)
        else:
            self.transport.write(self.p.not_found)

    def stream(self, usage: bool) -> None:
        assert self.transport is not None
        p = self.p
        tail = p.stream_tail_usage if usage else p.stream_tail
        if self.delay <= 0:
            self.transport.write(
                p.stream_head + p.stream_first + b"".join(p.stream_rest) + tail + p.stream_done
            )
            return
        # With a delay, the next request on this connection waits until the stream has ended.
        self.streaming = True
        self.transport.write(p.stream_head + p.stream_first)
        asyncio.get_running_loop().create_task(self._drip(tail))

    async def _drip(self, tail: bytes) -> None:
        assert self.transport is not None
        for part in self.p.stream_rest:
            await asyncio.sleep(self.delay)
            if self.transport.is_closing():
                return
            self.transport.write(part)
        self.transport.write(tail + self.p.stream_done)
        self.streaming = False
        if self.buffer:
            self.data_received(b"")


async def serve(host: str, port: int, model: str, chunks: int, delay_ms: float) -> None:
    payloads = Payloads(model, chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: MockProtocol(payloads, delay_ms / 1000), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"mock upstream on http://{host}:{port}/v1 ({type(loop).__module__})", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--chunks", type=int, default=8, help="content chunks in a streamed answer")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="pause between streamed chunks")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(serve(args.host, args.port, args.model, args.chunks, args.chunk_delay_ms))


if __name__ == "__main__":
    main()
