"""Open-loop and streaming load in Python asyncio, for what wrk cannot do (`bench/run.py` runs it).

wrk2 is not packaged by Debian, so the open loop is here: request i is *scheduled* at
`t0 + i / rate`, sent on an idle keep-alive connection (a new one when none is idle), and its
latency is measured from the scheduled time, not from when it could be sent. A server that falls
behind therefore shows its queueing in the latencies (no coordinated omission); the report keeps
the dispatcher's own lag so a slow client is visible too. The streaming mode sends `stream: true`
requests one after another (closed loop, `--concurrency`) and measures the time to the first
content chunk (the first SSE event with a non-empty `delta.content`) and to the end of the stream.

HTTP/1.1 is spoken by hand over asyncio streams (uvloop when installed), which costs far less
client CPU than an HTTP library on this shared 2-core machine. Every request that was sent is
waited for (up to `--timeout`), so calls served == answers counted. With `--values FILE`, each
request carries `--header` set to the next line of the file, never reused (x402 payments).
Prints one JSON object: counts, statuses, latencies (ms) and, for streams, first-content times.

    python bench/asyncload.py open --url http://127.0.0.1:8000/v1/chat/completions --rate 100 \
        --duration 10 --body body.json [-H 'Authorization: Bearer …'] [--values headers.txt]
    python bench/asyncload.py stream --url … --duration 10 --body body.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

CONTENT = re.compile(rb'"content":\s*"[^"]')
now = time.monotonic  # ns resolution; uvloop's loop.time() counts whole milliseconds


@dataclass
class Answer:
    status: int
    first_content: float | None = None  # loop time of the first content chunk
    done: float = 0.0


class Connection:
    # Servers close idle keep-alive connections (uvicorn after 5 s): one idle longer than this,
    # or already closed by the server, is opened again rather than written to and lost.
    MAX_IDLE = 4.0

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.idle_since = 0.0

    async def send(self, raw: bytes) -> Answer:
        stale = self.reader is not None and (
            self.reader.at_eof() or time.monotonic() - self.idle_since > self.MAX_IDLE
        )
        if stale:
            self.close()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        answer = Answer(status)
        if b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                data = await self.reader.readexactly(size + 2)
                if answer.first_content is None and CONTENT.search(data):
                    answer.first_content = now()
        else:
            match = re.search(rb"\r\ncontent-length:\s*(\d+)", lower)
            if match:
                body = await self.reader.readexactly(int(match.group(1)))
                if answer.first_content is None and CONTENT.search(body):
                    answer.first_content = now()
        answer.done = now()
        if b"connection: close" in lower:
            self.close()
        return answer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Load:
    url: str
    body: bytes
    headers: list[tuple[str, str]]
    values: Iterator[str] | None
    value_header: str
    timeout: float
    statuses: Counter[int] = field(default_factory=Counter)
    sent: int = 0
    exhausted: int = 0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path or "/"
        self.idle: list[Connection] = []

    def raw(self) -> bytes:
        lines = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(self.body)}",
            *(f"{k}: {v}" for k, v in self.headers),
        ]
        if self.values is not None:
            value = next(self.values, None)
            if value is None:
                self.exhausted += 1
                value = "exhausted"
            lines.append(f"{self.value_header}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body

    async def one(self) -> Answer:
        conn = self.idle.pop() if self.idle else Connection(self.host, self.port)
        self.sent += 1
        try:
            answer = await asyncio.wait_for(conn.send(self.raw()), self.timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            conn.close()
            self.statuses[-1] += 1
            print(f"asyncload: {type(exc).__name__}: {exc}", file=sys.stderr)
            return Answer(-1, None, now())
        self.statuses[answer.status] += 1
        if conn.writer is not None:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        return answer

    def close(self) -> None:
        for conn in self.idle:
            conn.close()


async def open_loop(load: Load, rate: float, duration: float) -> dict[str, Any]:
    n = max(1, int(rate * duration))
    latencies: list[float] = []
    ok_latencies: list[float] = []
    lag = 0.0

    async def one(scheduled: float) -> None:
        answer = await load.one()
        latencies.append((answer.done - scheduled) * 1000)
        if 200 <= answer.status < 300:
            ok_latencies.append((answer.done - scheduled) * 1000)

    tasks = []
    t0 = now() + 0.05
    for i in range(n):
        scheduled = t0 + i / rate
        delay = scheduled - now()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lag = max(lag, -delay)
        tasks.append(asyncio.ensure_future(one(scheduled)))
    await asyncio.gather(*tasks)
    elapsed = now() - t0
    load.close()
    return {
        "mode": "open",
        "rate": rate,
        "scheduled": n,
        "elapsed_s": elapsed,
        "achieved_rate": n / elapsed if elapsed > 0 else 0.0,
        "max_dispatch_lag_ms": lag * 1000,
        "latencies_ms": ok_latencies,
        "all_latencies_ms": latencies,
    }


async def stream_loop(load: Load, duration: float, concurrency: int) -> dict[str, Any]:
    first: list[float] = []
    total: list[float] = []
    end = now() + duration

    async def worker() -> None:
        while now() < end:
            started = now()
            answer = await load.one()
            if 200 <= answer.status < 300 and answer.first_content is not None:
                first.append((answer.first_content - started) * 1000)
                total.append((answer.done - started) * 1000)

    started = now()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = now() - started
    load.close()
    return {
        "mode": "stream",
        "concurrency": concurrency,
        "elapsed_s": elapsed,
        "first_content_ms": first,
        "latencies_ms": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["open", "stream"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="file with the JSON body")
    parser.add_argument("-H", "--add-header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--values", help="file of single-use header values, one per line")
    parser.add_argument("--header", default="PAYMENT-SIGNATURE", help="the header --values fills")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second (open)")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=1, help="streams at a time (stream)")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    values = None
    if args.values:
        with open(args.values) as handle:
            values = iter([line.strip() for line in handle if line.strip()])
    headers = [tuple(h.split(": ", 1)) for h in args.add_header]
    with open(args.body, "rb") as handle:
        body = handle.read()
    load = Load(args.url, body, headers, values, args.header, args.timeout)  # type: ignore[arg-type]

    async def run() -> dict[str, Any]:
        if args.mode == "open":
            return await open_loop(load, args.rate, args.duration)
        return await stream_loop(load, args.duration, args.concurrency)

    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run())
    else:
        result = uvloop.run(run())
    result.update(
        sent=load.sent,
        statuses={str(k): v for k, v in load.statuses.items()},
        exhausted=load.exhausted,
        wall_clock=time.time(),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
