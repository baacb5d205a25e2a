"""bench/RESULTS.md from bench/results/bench.json: every table, the ratios and the targets.

Each number is the median over the interleaved rounds with the min–max beside it. "Added" latency
is a path's percentile minus the direct path's in the same round (the mock and the load generator
cost the same on every path), then the median over rounds. CPU per request is the path's proxy
process (all its threads and children) over the window, divided by the answered requests; for the
paid paths also with the settlement drain after the window. Ratios are to LiteLLM's and to the
bare proxy's number from the same table.

    .venv/bin/python bench/report.py bench/results/bench.json > bench/RESULTS.md
    .venv/bin/python bench/report.py --summary bench/results/bench.json   # the README's table
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable
from typing import Any

from quotra.config import Settings

# The settlement worker's defaults, as the relay under test runs them.
_SETTLEMENT = {
    name: Settings.model_fields[name].default
    for name in ("settlement_batch_size", "settlement_max_age_seconds")
}

Run = dict[str, Any]
QUICK_NOTE = " — **quick mode**: one short round, for development, not for quoting"
PATH_ORDER = ["direct", "bare", "litellm", "playground", "prepaid", "x402"]
DESCRIPTIONS = {
    "direct": "wrk → mock upstream (no proxy: the floor of latency)",
    "bare": "→ bare proxy (uvicorn + FastAPI + aiohttp, no payments, no database) → mock",
    "litellm": "→ LiteLLM proxy (no database, no callbacks, master key) → mock",
    "playground": "→ quotra serve, free playground call → mock",
    "prepaid": "→ quotra serve, prepaid API key (reserve → capture → settle_charges) → mock",
    "x402": "→ quotra serve, a fresh x402 payment per call "
    "(verify → reserve → capture → settle_authorizations) → mock",
}


def _order(path: str) -> tuple[int, str]:
    base = path.split("-")[0]
    return (PATH_ORDER.index(base) if base in PATH_ORDER else 99, path)


def med(values: Iterable[float | None]) -> float:
    clean = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(clean) if clean else float("nan")


def spread(values: Iterable[float | None], fmt: str = "{:.2f}") -> str:
    clean = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not clean:
        return "–"
    m = statistics.median(clean)
    if len(clean) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} [{fmt.format(min(clean))}–{fmt.format(max(clean))}]"


def ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "–"
    return f"{a / b:.2f}×"


class Results:
    def __init__(self, data: dict[str, Any]) -> None:
        self.meta = data["meta"]
        self.runs: list[Run] = [r for r in data["runs"] if not r.get("skipped")]
        self.skipped: list[Run] = [r for r in data["runs"] if r.get("skipped")]
        self.paths = sorted({r["path"] for r in self.runs}, key=_order)

    def select(self, path: str, mode: str, rate: float | None = None) -> list[Run]:
        return [
            r
            for r in self.runs
            if r["path"] == path and r["mode"] == mode and (rate is None or r["rate"] == rate)
        ]

    def pct(self, run: Run, p: float, key: str = "percentiles") -> float:
        value = run[key].get(str(float(p))) if run.get(key) else None
        return float("nan") if value is None else float(value)

    def values(
        self, path: str, mode: str, get: Callable[[Run], float | None], rate: float | None = None
    ) -> list:
        return [get(r) for r in self.select(path, mode, rate)]

    def added(
        self, path: str, mode: str, p: float, key: str = "percentiles", rate: float | None = None
    ) -> list:
        """Per round: the path's percentile minus direct's."""
        direct = {r["round"]: self.pct(r, p, key) for r in self.select("direct", mode, rate)}
        out = []
        for r in self.select(path, mode, rate):
            if r["round"] in direct:
                out.append(self.pct(r, p, key) - direct[r["round"]])
        return out

    def cpu(self, path: str, mode: str = "c64", settled: bool = True) -> float:
        key = "cpu_settled_ms_per_request" if settled else "cpu_ms_per_request"
        values = self.values(
            path, mode, lambda r: r.get(key) if r.get(key) is not None else r.get("cpu_ms_per_request")
        )
        return med(values)


def closed_table(res: Results, mode: str) -> list[str]:
    conns = 1 if mode == "c1" else 64
    lines = [
        f"| path ({conns} connection{'s' if conns > 1 else ''}) | requests/s | p50 ms | p90 ms | p99 ms "
        "| p99.9 ms | added p50 ms | added p99 ms | CPU ms/request | with settlement | errors "
        "| lock sleeps (all rounds) | mock busy | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in res.paths:
        runs = res.select(path, mode)
        if not runs:
            continue
        settled = [r.get("cpu_settled_ms_per_request") for r in runs]
        sleeps = [r.get("lock_sleeps") for r in runs if r.get("lock_sleeps") is not None]
        lines.append(
            f"| {path} | {spread([r['rps'] for r in runs], '{:,.0f}')} "
            f"| {spread([res.pct(r, 50) for r in runs])} | {spread([res.pct(r, 90) for r in runs])} "
            f"| {spread([res.pct(r, 99) for r in runs])} | {spread([res.pct(r, 99.9) for r in runs])} "
            f"| {spread(res.added(path, mode, 50))} | {spread(res.added(path, mode, 99))} "
            f"| {spread([r['cpu_ms_per_request'] for r in runs])} "
            f"| {spread(settled) if any(v is not None for v in settled) else ''} "
            f"| {sum(r['errors'] for r in runs)} | {f'{sum(sleeps):,}' if sleeps else ''} "
            f"| {max(r['mock_busy'] for r in runs):.0%} "
            f"| {spread([r.get('foreign_cores') for r in runs], '{:.2f}')} |"
        )
    return lines


def open_tables(res: Results) -> list[str]:
    rates = sorted({r["rate"] for r in res.runs if r["mode"] == "open"})
    lines: list[str] = []
    for rate in rates:
        lines += [
            "",
            f"**{rate:g} requests/s** (open loop: latency from each request's scheduled time)",
            "",
            "| path | achieved req/s | p50 ms | p99 ms | p99.9 ms | max ms | added p50 ms | added p99 ms "
            "| CPU ms/request | with settlement | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for path in res.paths:
            runs = res.select(path, "open", rate)
            if not runs:
                if any(s["path"] == path and s["rate"] == rate for s in res.skipped):
                    lines.append(
                        f"| {path} | skipped: above 85% of its saturation throughput | | | | | | | | | |"
                    )
                continue
            settled = [r.get("cpu_settled_ms_per_request") for r in runs]
            lines.append(
                f"| {path} | {spread([r['extra'].get('achieved_rate', r['rps']) for r in runs], '{:,.1f}')} "
                f"| {spread([res.pct(r, 50) for r in runs])} | {spread([res.pct(r, 99) for r in runs])} "
                f"| {spread([res.pct(r, 99.9) for r in runs])} | {spread([res.pct(r, 99.99) for r in runs])} "
                f"| {spread(res.added(path, 'open', 50, rate=rate))} "
                f"| {spread(res.added(path, 'open', 99, rate=rate))} "
                f"| {spread([r['cpu_ms_per_request'] for r in runs])} "
                f"| {spread(settled) if any(v is not None for v in settled) else ''} "
                f"| {sum(r['errors'] for r in runs)} |"
            )
    return lines


def stream_table(res: Results) -> list[str]:
    lines = [
        "| path (1 client, streaming) | first content p50 ms | p99 ms | added p50 ms | added p50 ÷ LiteLLM's "
        "| whole stream p50 ms | p99 ms | added p50 ms | CPU ms/request | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    llm = med(res.added("litellm", "stream", 50, "first_content"))
    for path in res.paths:
        runs = res.select(path, "stream")
        if not runs:
            continue
        added = res.added(path, "stream", 50, "first_content")
        lines.append(
            f"| {path} | {spread([res.pct(r, 50, 'first_content') for r in runs])} "
            f"| {spread([res.pct(r, 99, 'first_content') for r in runs])} | {spread(added)} "
            f"| {ratio(med(added), llm) if path != 'direct' else ''} "
            f"| {spread([res.pct(r, 50) for r in runs])} | {spread([res.pct(r, 99) for r in runs])} "
            f"| {spread(res.added(path, 'stream', 50))} | {spread([r['cpu_ms_per_request'] for r in runs])} "
            f"| {sum(r['errors'] for r in runs)} |"
        )
    return lines


def headline(res: Results) -> list[str]:
    llm_cpu, bare_cpu = res.cpu("litellm"), res.cpu("bare")
    llm_rps = med(res.values("litellm", "c64", lambda r: r["rps"]))
    bare_rps = med(res.values("bare", "c64", lambda r: r["rps"]))
    llm_add50 = med(res.added("litellm", "c1", 50))
    lines = [
        "| path | CPU ms/request (64 conns) | ÷ LiteLLM | ÷ bare | req/s at 64 | ÷ LiteLLM | ÷ bare "
        "| added p50 ms, 1 conn | ÷ LiteLLM's | added p99 ms, 1 conn | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in res.paths:
        cpu = res.cpu(path)
        rps = med(res.values(path, "c64", lambda r: r["rps"]))
        add50 = med(res.added(path, "c1", 50))
        add99 = med(res.added(path, "c1", 99))
        errors = sum(r["errors"] for r in res.runs if r["path"] == path)
        lines.append(
            f"| {path} | {cpu:.2f} | {ratio(cpu, llm_cpu)} | {ratio(cpu, bare_cpu)} | {rps:,.0f} "
            f"| {ratio(rps, llm_rps)} | {ratio(rps, bare_rps)} | {add50:.2f} | "
            f"{ratio(add50, llm_add50) if path != 'direct' else ''} | {add99:.2f} | {errors} |"
        )
    return lines


def targets(res: Results, idle: dict[str, float]) -> list[str]:
    """DESIGN.md section 5, measured."""
    llm_cpu, bare_cpu = res.cpu("litellm"), res.cpu("bare")
    llm_rps = med(res.values("litellm", "c64", lambda r: r["rps"]))
    llm_add50 = med(res.added("litellm", "c1", 50))
    llm_ttfc = med(res.added("litellm", "stream", 50, "first_content"))
    rows: list[tuple[str, str, str, bool | None]] = []

    def row(what: str, target: str, value: float, ok: bool, fmt: str = "{:.2f}") -> None:
        rows.append(
            (what, target, "–" if math.isnan(value) else fmt.format(value), None if math.isnan(value) else ok)
        )

    for path, limit in (("prepaid", 0.15), ("x402", 0.25), ("playground", 0.10)):
        if path not in res.paths:
            continue
        cpu = res.cpu(path)
        row(
            f"CPU per {path} call (hot path + settlement) ÷ LiteLLM's",
            f"≤ {limit}×",
            cpu / llm_cpu,
            cpu / llm_cpu <= limit,
            "{:.2f}×",
        )
        row(f"CPU per {path} call ÷ bare proxy's", "≤ 1.5×", cpu / bare_cpu, cpu / bare_cpu <= 1.5, "{:.2f}×")
    for path in ("playground", "prepaid", "x402"):
        if path not in res.paths:
            continue
        add50, add99 = med(res.added(path, "c1", 50)), med(res.added(path, "c1", 99))
        row(
            f"{path}: added p50 at 1 client ÷ LiteLLM's",
            "≤ 0.2×",
            add50 / llm_add50,
            add50 / llm_add50 <= 0.2,
            "{:.2f}×",
        )
        what = f"{path}: added p99 at 1 client ÷ LiteLLM's added p50 ({llm_add50:.2f} ms)"
        row(what, "≤ 1×", add99 / llm_add50,
            add99 <= llm_add50, "{:.2f}×")  # fmt: skip
        ttfc = med(res.added(path, "stream", 50, "first_content"))
        row(
            f"{path}: streaming added time to first content ÷ LiteLLM's",
            "≤ 0.2×",
            ttfc / llm_ttfc,
            ttfc / llm_ttfc <= 0.2,
            "{:.2f}×",
        )
    for path, limit, floor in (("prepaid", 5, 1000), ("x402", 3, 600)):
        if path not in res.paths:
            continue
        rps = med(res.values(path, "c64", lambda r: r["rps"]))
        row(
            f"{path}: throughput at 64 clients ÷ LiteLLM's",
            f"≥ {limit}×",
            rps / llm_rps,
            rps / llm_rps >= limit,
            "{:.2f}×",
        )
        row(f"{path}: paid calls/s at 64 clients", f"≥ {floor:,}", rps, rps >= floor, "{:,.0f}")
    for path in ("playground", "prepaid", "x402"):
        if path not in res.paths:
            continue
        errors = sum(r["errors"] for r in res.runs if r["path"] == path)
        row(f"{path}: errors (all windows)", "0", errors, errors == 0, "{:.0f}")
        sleeps = [
            r["lock_sleeps"] for r in res.runs if r["path"] == path and r.get("lock_sleeps") is not None
        ]
        if sleeps:
            row(f"{path}: SQLite lock sleeps (all windows)", "0", sum(sleeps), sum(sleeps) == 0, "{:.0f}")
    for name, value in idle.items():
        if name.startswith("relay"):
            row(f"idle CPU of {name}", "≤ 5 ms/s", value, value <= 5, "{:.2f} ms/s")
    lines = ["| target (DESIGN.md §5) | wanted | measured | met |", "|---|---|---:|:---:|"]
    for what, target, value, ok in rows:
        lines.append(
            f"| {what} | {target} | {value} | {'–' if ok is None else ('yes' if ok else '**no**')} |"
        )
    missed = [what for what, _target, _value, ok in rows if ok is False]
    if missed:
        lines += [
            "",
            f"Not met in this run: {'; '.join(missed)}. What limits each is read from this run's "
            'profiles ("Where the time goes" below, and bench/results/profiles); the project '
            'README\'s "Relay benchmark" section says it for the run it quotes.',
        ]
    return lines


def render(data: dict[str, Any]) -> str:
    res = Results(data)
    meta = data["meta"]
    m, s = meta["machine"], meta["settings"]
    mock = meta.get("mock", {})
    idle = meta.get("idle_ms_per_s", {})
    out = [
        "# Relay benchmark results",
        "",
        f"Written by `bench/run.py` (`make bench{' BENCH_QUICK=1' if s.get('quick') else ''}`) "
        f"on {m['date']}, commit {m['git']}, in {meta['seconds'] / 60:.1f} minutes"
        f"{QUICK_NOTE if s.get('quick') else ''}. "
        "Every number is the median over the interleaved rounds, with [min–max] across rounds. "
        "How to run it and read it: bench/README.md.",
        "",
        "## Machine and versions",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores "
        "(shared by the load generator, the mock, the proxy and the chain)",
        f"- {m['os']}, kernel {m['kernel']}, Python {m['python']}",
        "- Quotra's stack: " + ", ".join(f"{k} {v}" for k, v in m["quotra_packages"].items()),
        f"- LiteLLM {m['litellm']} (own virtual environment, `bench/requirements-litellm.txt`), {m['wrk']}",
        f"- anvil: {(m.get('anvil') or ['?'])[0]}",
        "",
        "## Settings",
        "",
        f"- {s['rounds']} rounds; paths in a rotated order each round; closed loop with wrk for "
        f"{s['c1_seconds']:g} s at 1 connection and {s['c64_seconds']:g} s at 64 (2 threads); open loop "
        f"(bench/asyncload.py, coordinated-omission-safe) for {s['open_seconds']:g} s at "
        f"{', '.join(f'{r:g}' for r in s['rate_list'])} requests/s; streaming at 1 client for "
        f"{s['stream_seconds']:g} s ({s['chunks']} content chunks, "
        f"{s['chunk_delay_ms']:g} ms apart at the mock).",
        f"- Request: one user message, `max_tokens` 16; answer: a fixed `chat.completion` with usage. "
        f"Quotra: `quotra serve` on {s['store']}, one uvicorn worker, settlement worker and indexer on "
        f"(batches of up to {_SETTLEMENT['settlement_batch_size']}, "
        f"{_SETTLEMENT['settlement_max_age_seconds']:g} s max age: the product's defaults), direct relayer, "
        "listing price 0.0001 USDC "
        f"per call, {s['x402_payers']} x402 payer wallets, a fresh signed payment per x402 request "
        "(never reused).",
        "- CPU per request: utime+stime of the proxy's process tree (/proc) over the window ÷ answered "
        "requests. 'with settlement': the relay's CPU from the window's start until the settlement worker "
        "had settled every call of the window on the twin (the relay settles in-process; anvil's own CPU "
        "is not counted).",
        "- Lock sleeps: relative-time nanosleep/clock_nanosleep calls of the relay's threads during the "
        "window and its drain, counted by the kernel (`perf stat` on the syscall tracepoints: nothing "
        "stops the relay): SQLite's busy handler is what sleeps there.",
        "",
        "## The mock upstream is not the limit",
        "",
        f"wrk at 64 connections straight at the mock: **{mock.get('rps', float('nan')):,.0f} requests/s**, "
        f"{mock.get('cpu_ms_per_request', float('nan')) * 1000:.1f} µs of CPU per request, p50 "
        f"{mock.get('p50_ms', float('nan')):.2f} ms, {mock.get('errors', 0)} errors. The `mock busy` columns "
        "give its CPU share during each window (the worst round).",
        "",
        "`other load`: cores' worth of CPU that processes outside the benchmark used during the window "
        "(this machine is shared; /proc/stat minus the bench's own process tree). Rounds with other load "
        "are noisier; the medians and ratios are what to quote.",
        "",
        "## Headline: cost and speed of each path",
        "",
        *headline(res),
        "",
        "Paths: " + "; ".join(f"**{p}** {DESCRIPTIONS.get(p.split('-')[0], '')}" for p in res.paths) + ".",
        "CPU for the paid paths includes their share of settlement. "
        "÷ = ratio to LiteLLM's or the bare proxy's number.",
        "",
        "## Targets (DESIGN.md §5)",
        "",
        *targets(res, idle),
        "",
        "## Closed loop, 1 connection",
        "",
        *closed_table(res, "c1"),
        "",
        "## Closed loop, 64 connections (saturation)",
        "",
        *closed_table(res, "c64"),
        "",
        "## Open loop at fixed rates",
        *open_tables(res),
        "",
        "## Streaming, 1 client",
        "",
        *stream_table(res),
        "",
        "## Idle CPU (no traffic)",
        "",
        "| process | ms of CPU per second |",
        "|---|---:|",
        *(f"| {k} | {v:.2f} |" for k, v in idle.items()),
        "",
        "## Books check",
        "",
        "Calls answered 2xx to the clients (every window, warm-up and profile included), requests written "
        "but not answered when a wrk window ended (the relay may still have served and charged them), calls "
        "the relay recorded as served, charges recorded, settled, and USDC moved on chain (x402: what the "
        "payers' wallets lost; prepaid: what left the consumer's deposit). The run fails unless served is "
        "within [answered, answered + unanswered], served == charged == settled == on chain, the "
        "provider's escrow earnings == its 90% of what settled, the escrow's platform fees == the relays' "
        "fees together, and the escrow solvent (USDC balance == liabilities()).",
        "",
    ]
    for relay, books in meta.get("books", {}).items():
        out += [
            f"**{relay}**: {'balanced' if not books['failures'] else '**NOT BALANCED**'}",
            "",
            "| path | answered 2xx | unanswered | served (relay) | charged | settled | settled USDC "
            "| moved on chain USDC |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *books["lines"],
            "",
            *(f"- **{f}**" for f in books["failures"]),
        ]
    if meta.get("profiles"):
        out += ["## Profiles", "", *(f"- `{p}`" for p in meta["profiles"]), ""]
    out += where_the_time_goes(meta.get("profile_breakdown", {}))
    out += [
        "## Plots",
        "",
        "![latency CDF, 1 connection](results/latency-cdf-c1.png)",
        "![latency CDF, 64 connections](results/latency-cdf-c64.png)",
        "![CPU per request by path](results/cpu-per-request.png)",
        "",
        "## Gas per paid call (bench/gas.py)",
        "",
        meta.get("gas_table", "").replace("# Escrow gas per paid call\n\n", ""),
    ]
    return "\n".join(out).rstrip() + "\n"


def where_the_time_goes(breakdowns: dict[str, Any]) -> list[str]:
    """Each profiled path's samples per thread and its event loop's share per component."""
    if not breakdowns:
        return []
    out = [
        "## Where the time goes (py-spy, the profiles above)",
        "",
        "Wall-clock samples of a 64-connection window and its settlement: seconds each thread was "
        "seen active (a thread waiting for the GIL counts as active), and the event loop's samples "
        "by component (the settlement worker and indexer by any frame, the rest by the innermost "
        "frame).",
        "",
    ]
    for path, b in breakdowns.items():
        threads = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in list(b["threads"].items())[:3])
        out += [
            f"**{path}**: {threads}",
            "",
            "| event loop component | share |",
            "|---|---:|",
            *(f"| {name} | {share:.0%} |" for name, share in b["loop"] if share >= 0.005),
            "",
        ]
    return out


def summary(data: dict[str, Any]) -> str:
    """The short table the project README quotes (`bench/report.py --summary bench.json`)."""
    res = Results(data)
    llm_cpu = res.cpu("litellm")
    llm_rps = med(res.values("litellm", "c64", lambda r: r["rps"]))
    lines = [
        "| path | CPU ms/request | ÷ LiteLLM | req/s, 64 clients | ÷ LiteLLM | added p50 / p99 ms, 1 client "
        "| streaming: added time to first content ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for path in res.paths:
        if path == "direct":
            continue
        cpu = res.cpu(path)
        rps = med(res.values(path, "c64", lambda r: r["rps"]))
        add50, add99 = med(res.added(path, "c1", 50)), med(res.added(path, "c1", 99))
        ttfc = med(res.added(path, "stream", 50, "first_content"))
        lines.append(
            f"| {path} | {cpu:.1f} | {ratio(cpu, llm_cpu)} | {rps:,.0f} | {ratio(rps, llm_rps)} "
            f"| {add50:.1f} / {add99:.1f} | {ttfc:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    summary_only = sys.argv[1] == "--summary"
    with open(sys.argv[-1]) as handle:
        loaded = json.load(handle)
    sys.stdout.write(summary(loaded) if summary_only else render(loaded))
