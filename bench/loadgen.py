"""Load generators, as the benchmark drives them: wrk (closed loop) and bench/asyncload.py.

`wrk_closed(...)` runs `wrk` with bench/wrk/bench.lua for a fixed duration at a fixed number of
connections and returns a `Window` (requests answered, non-2xx and socket errors, latency
percentiles from wrk's HdrHistogram, requests written vs answered). `python_load(...)` runs
bench/asyncload.py (open loop at a fixed rate, or streaming) in the bench tools' virtual
environment and returns the same shape with the raw latencies. Both count every request written,
so the books check knows how many paid calls a client may have left unanswered.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
LUA = BENCH / "wrk" / "bench.lua"
PERCENTILES = [*range(1, 100), 99.5, 99.9, 99.99]


@dataclass
class Window:
    """What one load window measured (latencies in milliseconds)."""

    tool: str
    seconds: float
    ok: int  # 2xx answers
    errors: int  # non-2xx answers, socket errors and timeouts
    sent: int  # requests written (an unanswered one may still have been served)
    answered: int
    exhausted: int = 0  # requests sent without a fresh single-use header
    percentiles: dict[float, float] = field(default_factory=dict)  # p -> ms
    latencies: list[float] = field(default_factory=list)  # raw, when the tool keeps them
    first_content: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0  # wall clock
    ended: float = 0.0

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def pct(self, p: float) -> float:
        if self.percentiles:
            return self.percentiles.get(p, float("nan"))
        return percentile(self.latencies, p)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[rank]


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not installed: `apt-get install -y wrk` (make bench does it)")
    return found


def wrk_closed(
    url: str,
    body: Path,
    *,
    connections: int,
    duration: float,
    headers: list[str] | None = None,
    values: Path | None = None,
    value_header: str = "PAYMENT-SIGNATURE",
    timeout: float = 30.0,
) -> Window:
    threads = 1 if connections < 2 else 2
    argv = [
        wrk_binary(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
        "--timeout", f"{timeout:.0f}s", "-s", str(LUA),
    ]  # fmt: skip
    for header in headers or []:
        argv += ["-H", header]
    argv += [url, "--", str(body), str(values) if values else "-", str(threads), value_header]
    started = time.time()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + timeout + 60, check=False)
    ended = time.time()
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]} {done.stdout[-500:]}"
        )
    data = json.loads(line[len("WRK_JSON ") :])
    errors = data["errors"]
    answered = int(data["requests"])
    ok = answered - int(errors["status"])
    socket_errors = (
        int(errors["connect"]) + int(errors["read"]) + int(errors["write"]) + int(errors["timeout"])
    )
    return Window(
        tool="wrk",
        seconds=data["duration_us"] / 1e6,
        ok=ok,
        errors=int(errors["status"]) + socket_errors,
        sent=int(data["sent"]),
        answered=answered,
        exhausted=int(data["exhausted"]),
        percentiles={float(k): v / 1000 for k, v in data["latency"]["percentiles"].items()},
        extra={
            "errors": errors,
            "min_ms": data["latency"]["min"] / 1000,
            "max_ms": data["latency"]["max"] / 1000,
        },
        started=started,
        ended=ended,
    )


def python_load(
    python: str,
    mode: str,
    url: str,
    body: Path,
    *,
    duration: float,
    rate: float = 0.0,
    concurrency: int = 1,
    headers: list[str] | None = None,
    values: Path | None = None,
    timeout: float = 60.0,
) -> Window:
    argv = [python, str(BENCH / "asyncload.py"), mode, "--url", url, "--body", str(body)]
    argv += ["--duration", str(duration), "--timeout", str(timeout)]
    if mode == "open":
        argv += ["--rate", str(rate)]
    else:
        argv += ["--concurrency", str(concurrency)]
    for header in headers or []:
        argv += ["-H", header]
    if values is not None:
        argv += ["--values", str(values)]
    started = time.time()
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration * 4 + timeout + 60, check=False
    )
    ended = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"asyncload failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    statuses = {int(k): v for k, v in data["statuses"].items()}
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    answered = sum(v for k, v in statuses.items() if k > 0)
    return Window(
        tool="asyncload",
        seconds=float(data["elapsed_s"]),
        ok=ok,
        errors=sum(statuses.values()) - ok,
        sent=int(data["sent"]),
        answered=answered,
        exhausted=int(data["exhausted"]),
        latencies=[float(x) for x in data["latencies_ms"]],
        first_content=[float(x) for x in data.get("first_content_ms", [])],
        extra={k: data[k] for k in ("rate", "achieved_rate", "max_dispatch_lag_ms", "statuses") if k in data},
        started=started,
        ended=ended,
    )
