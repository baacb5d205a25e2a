"""The relay benchmark (issue 10): Quotra beside LiteLLM and a bare proxy, on one machine.

Starts a fast mock upstream (and measures its own requests/s), the bare pass-through proxy,
LiteLLM's proxy, a Base Sepolia twin with the escrow, and `quotra serve` (SQLite; PostgreSQL too
with --store postgres|both), each its own process. Then, in R interleaved rounds (each round
runs every path once per load mode, in a rotated order), it measures six paths:

    direct      wrk -> mock upstream (the floor of latency)
    bare        -> bare proxy (uvicorn + FastAPI + aiohttp, no payments, no database) -> mock
    litellm     -> LiteLLM proxy -> mock
    playground  -> quotra serve, free calls -> mock
    prepaid     -> quotra serve, `Authorization: Bearer sk-quotra-…` -> mock
    x402        -> quotra serve, a fresh signed PAYMENT-SIGNATURE per request -> mock

under closed loop at 1 and 64 connections (wrk), open loop at fixed rates below saturation and
streaming at one client (bench/asyncload.py). Each window records latency, answers, errors and the
CPU time of the path's proxy process per answered request (/proc); paid windows then wait until
the settlement worker has settled every call and record the CPU again (hot path vs with
settlement). It measures every proxy's idle CPU, counts SQLite busy-handler sleeps in the relay
(perf stat), checks the books (calls served == charges recorded == settled == moved on chain),
optionally profiles paths with py-spy, and writes bench/results/bench.json, bench/RESULTS.md
(with bench/gas.py's table) and PNG plots. Exits 1 when the books do not balance.

    .venv/bin/python bench/run.py [--quick] [--rounds 4] [--store sqlite|postgres|both] [--profile x402]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import loadgen
import procstat
import profiling
import proxies
import quotra_setup as qs
import report
from loadgen import PERCENTILES, Window, percentile
from proxies import Target
from quotra_dev.twin import free_port

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"
BODY = {
    "model": proxies.MODEL,
    "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    "max_tokens": 16,
}
STREAM_BODY = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
PATHS = ["direct", "bare", "litellm", "playground", "prepaid", "x402"]
QUOTRA_PATHS = {"playground", "prepaid", "x402"}
log = qs.log


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="one short round: a few minutes, for development"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 4; quick 1)")
    parser.add_argument(
        "--c1-seconds", type=float, default=None, help="closed loop, 1 connection (default 8)"
    )
    parser.add_argument(
        "--c64-seconds", type=float, default=None, help="closed loop, 64 connections (default 10)"
    )
    parser.add_argument("--rates", default=None, help="open-loop rates, requests/s (default 10,20)")
    parser.add_argument("--open-seconds", type=float, default=None, help="open-loop window (default 8)")
    parser.add_argument("--stream-seconds", type=float, default=None, help="streaming window (default 6)")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU window")
    parser.add_argument("--paths", default=",".join(PATHS), help="which paths, comma-separated")
    parser.add_argument(
        "--store",
        choices=["sqlite", "postgres", "both"],
        default="sqlite",
        help="Quotra's database; postgres needs QUOTRA_BENCH_POSTGRES_URL or QUOTRA_TEST_POSTGRES_URL "
        "(tools/with-postgres.sh sets the latter)",
    )
    parser.add_argument("--x402-payers", type=int, default=16, help="wallets the x402 payments rotate over")
    parser.add_argument("--chunks", type=int, default=8, help="content chunks in a streamed answer")
    parser.add_argument(
        "--chunk-delay-ms", type=float, default=2.0, help="mock's pause between streamed chunks"
    )
    parser.add_argument(
        "--no-lock-trace", action="store_true", help="do not count the relay's SQLite lock sleeps (perf)"
    )
    parser.add_argument("--profile", default="", help="paths to profile with py-spy after the rounds")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument(
        "--profile-drain-seconds", type=float, default=10.0,
        help="how long a paid path's profile goes on sampling its settlement after the load",
    )  # fmt: skip
    parser.add_argument("--skip-gas", action="store_true", help="do not run bench/gas.py")
    parser.add_argument("--workdir", type=Path, help="keep the processes' logs and databases here")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--output", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "rounds": 1 if quick else 4,
        "c1_seconds": 3 if quick else 8,
        "c64_seconds": 4 if quick else 10,
        "rates": "10" if quick else "10,20",
        "open_seconds": 4 if quick else 8,
        "stream_seconds": 3 if quick else 6,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if quick:
        args.idle_seconds = min(args.idle_seconds, 5.0)
    args.rate_list = [float(r) for r in str(args.rates).split(",") if r.strip()]
    args.path_list = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(args.path_list) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    return args


class Bench:
    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack, workdir: Path) -> None:
        self.args = args
        self.stack = stack
        self.workdir = workdir
        self.targets: dict[str, Target] = {}
        self.callers: dict[str, qs.QuotraCallers] = {}  # store -> callers
        self.relays: dict[str, qs.Relay] = {}
        self.runs: list[dict[str, Any]] = []
        self.client_books: dict[str, dict[str, dict[str, int]]] = {}  # store -> kind -> counts
        self.body = workdir / "body.json"
        self.stream_body = workdir / "stream-body.json"
        self.body.write_text(json.dumps(BODY))
        self.stream_body.write_text(json.dumps(STREAM_BODY))
        self.mock_pid = 0
        self.count_sleeps = not args.no_lock_trace and procstat.LockSleeps.available()
        if not args.no_lock_trace and not self.count_sleeps:
            log("perf cannot count syscall tracepoints here: the relay's lock sleeps are not counted")
        self.meta: dict[str, Any] = {}

    # ---- processes ------------------------------------------------------------------------------

    def start(self) -> None:
        a = self.args
        log("starting the mock upstream")
        mock, upstream = proxies.start_mock(self.workdir, a.chunks, a.chunk_delay_ms)
        self.stack.callback(mock.stop)
        self.mock_pid = mock.popen.pid
        self.upstream = upstream
        self.meta["mock"] = self.measure_mock(upstream)
        paths = set(a.path_list)
        if "direct" in paths:
            self.targets["direct"] = Target(
                "direct",
                upstream + "/chat/completions",
                mock.popen.pid,
                [f"Authorization: Bearer {proxies.UPSTREAM_KEY}"],
            )
        if "bare" in paths:
            log("starting the bare proxy")
            bare, url = proxies.start_bare(self.workdir, upstream)
            self.stack.callback(bare.stop)
            self.targets["bare"] = Target("bare", url, bare.popen.pid)
        if "litellm" in paths:
            log("starting LiteLLM's proxy")
            llm, url = proxies.start_litellm(self.workdir, upstream)
            self.stack.callback(llm.stop)
            self.targets["litellm"] = Target(
                "litellm", url, llm.popen.pid, [f"Authorization: Bearer {proxies.LITELLM_MASTER_KEY}"]
            )
        if paths & QUOTRA_PATHS:
            self.start_quotra(paths & QUOTRA_PATHS)

    def measure_mock(self, upstream: str) -> dict[str, Any]:
        """The mock's own capacity: wrk at 64 connections straight at it, and its CPU per request."""
        log("measuring the mock upstream's own requests/s")
        url = upstream + "/chat/completions"
        loadgen.wrk_closed(url, self.body, connections=64, duration=2)  # warm-up
        cpu0 = procstat.cpu_seconds(self.mock_pid)
        window = loadgen.wrk_closed(url, self.body, connections=64, duration=5)
        cpu = procstat.cpu_seconds(self.mock_pid) - cpu0
        return {
            "rps": window.rps,
            "cpu_ms_per_request": cpu * 1000 / max(window.ok, 1),
            "errors": window.errors,
            "p50_ms": window.pct(50),
            "loop": "uvloop",
        }

    def stores(self) -> list[tuple[str, str]]:
        """(suffix, database URL) per Quotra store measured."""
        a = self.args
        result = []
        if a.store in ("sqlite", "both"):
            result.append(("", f"sqlite+aiosqlite:///{self.workdir / 'relay.db'}"))
        if a.store in ("postgres", "both"):
            url = os.environ.get("QUOTRA_BENCH_POSTGRES_URL") or os.environ.get("QUOTRA_TEST_POSTGRES_URL")
            if not url:
                raise SystemExit(
                    "--store postgres needs QUOTRA_BENCH_POSTGRES_URL (an empty database) or "
                    "tools/with-postgres.sh (make bench BENCH_POSTGRES=1)"
                )
            result.append(("-pg", url))
        return result

    def start_quotra(self, paths: set[str]) -> None:
        a = self.args
        stores = self.stores()
        log("starting the Base Sepolia twin and deploying the escrow")
        self.chain = qs.start_chain(self.stack, operators=len(stores))
        self.fees_before = int(self.chain.escrow.functions.platform_fees().call())
        for (suffix, database_url), operator in zip(stores, self.chain.operators, strict=False):
            name = "relay" + suffix
            log(f"starting quotra serve ({name}, {database_url.split(':')[0]})")
            relay = qs.start_relay(name, self.chain, operator, database_url, self.workdir, port=free_port())
            self.stack.callback(relay.process.stop)
            self.relays[name] = relay
            log(f"setting up a listing, a prepaid key and {a.x402_payers} x402 payers on {name}")
            callers = qs.QuotraCallers.create(
                relay, self.chain, self.upstream, proxies.UPSTREAM_KEY, proxies.MODEL, a.x402_payers
            )
            self.callers[name] = callers
            self.client_books[name] = {
                "x402": {"ok": 0, "unanswered": 0},
                "prepaid": {"ok": 0, "unanswered": 0},
            }
            url = relay.url + "/v1/chat/completions"
            for path in sorted(paths):
                key = path + suffix
                headers = [f"Authorization: Bearer {callers.api_key}"] if path == "prepaid" else []
                paid = path if path in ("x402", "prepaid") else None
                self.targets[key] = Target(key, url, relay.pid, headers, paid, relay)

    # ---- windows --------------------------------------------------------------------------------

    def x402_values(self, target: Target, expected: float) -> Path:
        relay = target.relay
        assert isinstance(relay, qs.Relay)
        n = int(expected * 1.5) + 200
        return self.callers[relay.name].x402_headers(n, self.workdir / "x402-values.txt")

    def expected_rps(self, target: str, mode: str, default: float) -> float:
        seen = [r["rps"] for r in self.runs if r["path"] == target and r["mode"] == mode and r.get("ok")]
        return max(seen) if seen else default

    def window(self, target: Target, mode: str, rnd: int, rate: float = 0.0) -> dict[str, Any] | None:
        a = self.args
        body = self.stream_body if mode == "stream" else self.body
        values = None
        if target.paid == "x402":
            # One connection can go as fast as 64 when the machine is quiet, and a round as much
            # faster than the last as the other load on this shared machine lets it: size the
            # single-use headers by the fastest window seen so far, never by the slowest.
            fastest = max(self.expected_rps(target.name, m, 150) for m in ("c1", "c64", "stream"))
            expected = {
                "c1": max(fastest, 400) * a.c1_seconds,
                "c64": max(fastest, 1_000) * a.c64_seconds,
                "open": rate * a.open_seconds,
                "stream": max(fastest, 400) * a.stream_seconds,
            }[mode]
            values = self.x402_values(target, expected)
        sleeps = (
            procstat.LockSleeps(target.pid, self.workdir / "lock-sleeps.csv")
            if self.count_sleeps and isinstance(target.relay, qs.Relay)
            else None
        )
        if sleeps is not None:
            time.sleep(0.3)  # perf attached to every thread before the load starts
        cpu0 = procstat.cpu_seconds(target.pid)
        mock0 = procstat.cpu_seconds(self.mock_pid)
        busy0, own0 = procstat.machine_busy_seconds(), procstat.own_seconds()
        if mode in ("c1", "c64"):
            connections = 1 if mode == "c1" else 64
            duration = a.c1_seconds if mode == "c1" else a.c64_seconds
            w = loadgen.wrk_closed(
                target.url,
                body,
                connections=connections,
                duration=duration,
                headers=target.headers,
                values=values,
            )
        elif mode == "open":
            w = loadgen.python_load(
                str(proxies.TOOLS_PYTHON), "open", target.url, body,
                duration=a.open_seconds, rate=rate, headers=target.headers, values=values,
            )  # fmt: skip
        else:
            w = loadgen.python_load(
                str(proxies.TOOLS_PYTHON), "stream", target.url, body,
                duration=a.stream_seconds, headers=target.headers, values=values,
            )  # fmt: skip
        cpu1 = procstat.cpu_seconds(target.pid)
        mock_cpu = procstat.cpu_seconds(self.mock_pid) - mock0
        foreign = (procstat.machine_busy_seconds() - busy0) - (procstat.own_seconds() - own0)
        drained_at = w.ended
        cpu2 = cpu1
        if target.paid:
            relay = target.relay
            assert isinstance(relay, qs.Relay)
            books = asyncio.run(qs.wait_settled(self.callers[relay.name]))
            cpu2 = procstat.cpu_seconds(target.pid)
            drained_at = time.time()
            self.count(target, w)
            if books.unsettled():
                log(
                    f"warning: {books.unsettled()} {target.name} calls still unsettled "
                    "after the drain timeout"
                )
        run = {
            "path": target.name,
            "mode": mode,
            "round": rnd,
            "rate": rate,
            "tool": w.tool,
            "seconds": w.seconds,
            "ok": w.ok,
            "errors": w.errors,
            "sent": w.sent,
            "answered": w.answered,
            "exhausted": w.exhausted,
            "rps": w.rps,
            "cpu_s": cpu1 - cpu0,
            "cpu_ms_per_request": (cpu1 - cpu0) * 1000 / w.ok if w.ok else None,
            "cpu_settled_ms_per_request": (cpu2 - cpu0) * 1000 / w.ok if w.ok and target.paid else None,
            "drain_s": drained_at - w.ended if target.paid else 0.0,
            "mock_busy": mock_cpu / w.seconds if w.seconds else 0.0,
            "foreign_cores": max(0.0, foreign) / w.seconds if w.seconds else 0.0,
            "percentiles": {str(float(p)): w.pct(p) for p in PERCENTILES},
            "first_content": {str(float(p)): percentile(w.first_content, p) for p in PERCENTILES}
            if w.first_content
            else {},
            "extra": w.extra,
            "started": w.started,
            "ended": w.ended,
            "lock_sleeps": None if sleeps is None else sleeps.stop(),  # in the window and its drain
        }
        self.runs.append(run)
        extra = f" {rate:g}/s" if mode == "open" else ""
        settle = (
            f", {run['cpu_settled_ms_per_request']:.2f} with settlement ({run['drain_s']:.1f} s drain)"
            if run["cpu_settled_ms_per_request"] is not None
            else ""
        )
        cpu = run["cpu_ms_per_request"]
        log(
            f"round {rnd + 1} {mode}{extra} {target.name}: {w.ok} ok, {w.errors} errors, {w.rps:.0f} req/s, "
            f"p50 {w.pct(50):.2f} ms, p99 {w.pct(99):.2f} ms, "
            f"CPU {'-' if cpu is None else f'{cpu:.2f}'} ms/req{settle}"
        )
        if w.exhausted:
            log(f"warning: {target.name} ran out of fresh x402 payment headers ({w.exhausted} sent without)")
        return run

    def count(self, target: Target, w: Window) -> None:
        """Every paid call a client saw answered (or left unanswered) goes into the books check."""
        if target.paid:
            relay = target.relay
            assert isinstance(relay, qs.Relay)
            counts = self.client_books[relay.name][target.paid]
            counts["ok"] += w.ok
            counts["unanswered"] += w.sent - w.answered

    def warm_up(self) -> None:
        log("warming up every path")
        for target in self.targets.values():
            values = self.x402_values(target, 800) if target.paid == "x402" else None
            w = loadgen.wrk_closed(
                target.url, self.body, connections=8, duration=2, headers=target.headers, values=values
            )
            self.count(target, w)
            if target.paid:
                relay = target.relay
                assert isinstance(relay, qs.Relay)
                asyncio.run(qs.wait_settled(self.callers[relay.name]))

    def rounds(self) -> None:
        a = self.args
        names = list(self.targets)
        for rnd in range(a.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            log(f"round {rnd + 1}/{a.rounds}: {', '.join(order)}")
            for mode in ("c1", "c64"):
                for name in order:
                    self.window(self.targets[name], mode, rnd)
            for rate in a.rate_list:
                for name in order:
                    saturation = self.expected_rps(name, "c64", 0)
                    if saturation and rate > 0.85 * saturation:
                        log(
                            f"round {rnd + 1} open {rate:g}/s {name}: "
                            f"skipped (saturates at {saturation:.0f}/s)"
                        )
                        self.runs.append(
                            {"path": name, "mode": "open", "round": rnd, "rate": rate, "skipped": True}
                        )
                        continue
                    self.window(self.targets[name], "open", rnd, rate)
            for name in order:
                self.window(self.targets[name], "stream", rnd)

    def idle(self) -> dict[str, float]:
        """ms of CPU per second of every process with no traffic, all measured in one window."""
        log(f"measuring idle CPU for {self.args.idle_seconds:g} s")
        for callers in self.callers.values():  # the profiles' calls settled first: no traffic left
            asyncio.run(qs.wait_settled(callers))
        time.sleep(2)
        pids = {"mock upstream": self.mock_pid}
        for target in self.targets.values():
            label = target.relay.name if isinstance(target.relay, qs.Relay) else target.name
            if target.name != "direct":
                pids[label] = target.pid
        before = {k: procstat.precise_cpu_seconds(p) for k, p in pids.items()}
        started = time.monotonic()
        time.sleep(self.args.idle_seconds)
        elapsed = time.monotonic() - started
        return {k: (procstat.precise_cpu_seconds(p) - before[k]) * 1000 / elapsed for k, p in pids.items()}

    def profile(self) -> list[str]:
        """py-spy on a path's process during an extra (unmeasured) 64-connection window per format;
        for a paid path the sampling goes on through the settlement of the window's calls (up to
        --profile-drain-seconds), so the profile shows what a call costs hot and settled."""
        names = [p.strip() for p in self.args.profile.split(",") if p.strip()]
        written = []
        seconds = self.args.profile_seconds
        for name in names:
            target = self.targets.get(name)
            if target is None:
                log(f"--profile {name}: not a measured path")
                continue
            for fmt in ("flamegraph", "speedscope"):
                values = None
                if target.paid == "x402":
                    values = self.x402_values(target, self.expected_rps(name, "c64", 400) * seconds)
                drain = self.args.profile_drain_seconds if target.paid else 0.0
                log(
                    f"profiling {name} with py-spy ({fmt}, {seconds:g} s at 64 connections"
                    + (f", then up to {drain:g} s of its settlement)" if drain else ")")
                )

                def load(t: Target = target, v: Path | None = values) -> loadgen.Window:
                    w = loadgen.wrk_closed(
                        t.url, self.body, connections=64, duration=seconds, headers=t.headers, values=v
                    )
                    if t.paid:
                        assert isinstance(t.relay, qs.Relay)
                        asyncio.run(qs.wait_settled(self.callers[t.relay.name]))
                    return w

                out, w = profiling.record(
                    target.pid, name, fmt, seconds + drain, load, self.args.results_dir / "profiles"
                )
                self.count(target, w)
                if out:
                    written.append(str(out.relative_to(self.args.results_dir.parent)))
                    if fmt == "speedscope":
                        self.meta.setdefault("profile_breakdown", {})[name] = profiling.breakdown(out)
        return written

    def books(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        fees = 0
        for name, callers in self.callers.items():
            books = asyncio.run(qs.wait_settled(callers))
            fees += books.fees()
            client = self.client_books[name]
            check = qs.check_books(books, client)
            result[name] = {
                "lines": check.lines,
                "failures": check.failures,
                "calls": books.calls,
                "x402": books.x402,
                "prepaid": books.prepaid,
                "solvent": books.solvent,
                "client": client,
            }
        if self.callers:
            # One escrow serves every relay measured: its platform fees are their fees together.
            onchain = int(self.chain.escrow.functions.platform_fees().call()) - self.fees_before
            first = next(iter(result.values()))
            first["lines"].append(
                f"| platform fees (all relays) | | | | | | {fees / 1e6:.4f} | {onchain / 1e6:.4f} |"
            )
            if onchain != fees:
                first["failures"].append(
                    f"the escrow's platform fees grew by {onchain}, the relay's calls say {fees}"
                )
        return result


def machine(args: argparse.Namespace) -> dict[str, Any]:
    def cmd(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            return (out.stdout or out.stderr).strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version

    packages = [
        "fastapi",
        "starlette",
        "uvicorn",
        "aiohttp",
        "httpx",
        "sqlalchemy",
        "aiosqlite",
        "asyncpg",
        "pydantic",
        "x402",
        "web3",
    ]
    wrk_version = cmd(["wrk", "--version"]).splitlines()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "os": cmd(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "quotra_packages": {p: version(p) for p in packages},
        "litellm": proxies.litellm_version(),
        "wrk": wrk_version[0] if wrk_version else "?",
        "anvil": cmd(
            [str(Path(__file__).resolve().parents[1] / "node_modules" / ".bin" / "anvil"), "--version"]
        ).splitlines()[0:1],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "git": cmd(["git", "-C", str(BENCH), "rev-parse", "--short", "HEAD"]),
    }


def run_gas(args: argparse.Namespace) -> str:
    gas_md = args.results_dir / "gas.md"
    if not args.skip_gas:
        log("running bench/gas.py")
        done = subprocess.run([sys.executable, str(BENCH / "gas.py"), "--output", str(gas_md)], check=False)
        if done.returncode != 0:
            log("bench/gas.py failed; RESULTS.md keeps the last gas table it finds")
    return gas_md.read_text() if gas_md.exists() else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for needed in (proxies.TOOLS_PYTHON, proxies.LITELLM):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run `make bench` (it builds the bench's environments)")
    loadgen.wrk_binary()
    started = time.monotonic()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "machine": machine(args),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
    }
    meta["settings"]["results_dir"] = str(args.results_dir)
    meta["settings"]["workdir"] = str(args.workdir) if args.workdir else None
    with contextlib.ExitStack() as stack:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            tmp = str(args.workdir.resolve())
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="quotra-bench-"))
        bench = Bench(args, stack, Path(tmp))
        bench.start()
        bench.warm_up()
        bench.rounds()
        profiles = bench.profile() if args.profile else []
        books = bench.books()
        idle = bench.idle()
        for relay in bench.relays.values():
            relay.process.stop()
        meta.update(bench.meta)
        meta["idle_ms_per_s"] = idle
        meta["books"] = books
        meta["profiles"] = profiles
        runs = bench.runs
        with contextlib.suppress(OSError):
            for name in ("relay.log", "relay-pg.log", "litellm.log"):
                text = (Path(tmp) / name).read_text(errors="replace") if (Path(tmp) / name).exists() else ""
                errors = [line for line in text.splitlines() if "Traceback" in line or "ERROR" in line]
                meta.setdefault("process_log_errors", {})[name] = len(errors)
    meta["gas_table"] = run_gas(args)
    meta["seconds"] = time.monotonic() - started
    data = {"meta": meta, "runs": runs}
    (args.results_dir / "bench.json").write_text(json.dumps(data, indent=1, default=str))
    text = report.render(data)
    args.output.write_text(text)
    log(f"wrote {args.output} and {args.results_dir / 'bench.json'} in {meta['seconds'] / 60:.1f} min")
    plots = subprocess.run(
        [
            str(proxies.TOOLS_PYTHON),
            str(BENCH / "plots.py"),
            str(args.results_dir / "bench.json"),
            str(args.results_dir),
        ],
        check=False,
    )
    if plots.returncode != 0:
        log("plots failed")
    failures = [f for b in books.values() for f in b["failures"]]
    for failure in failures:
        log(f"BOOKS DO NOT BALANCE: {failure}")
    if failures:
        return 1
    log("books balance: calls served == charges recorded == settled == moved on chain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
