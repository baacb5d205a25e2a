"""PNG plots of a benchmark run (matplotlib, in the bench tools' environment; run.py calls it).

    .cache/bench/tools/bin/python bench/plots.py bench/results/bench.json bench/results

latency-cdf-c1.png / latency-cdf-c64.png: each path's latency distribution (wrk's percentiles, the
median over rounds at each percentile), log-scaled milliseconds against percentiles on a "nines"
scale (50, 90, 99, 99.9, 99.99); cpu-per-request.png: CPU per
request by path (hot path, and with settlement for the paid paths), median with the min–max range.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ORDER = ["direct", "bare", "litellm", "playground", "prepaid", "x402"]


def order(path: str) -> tuple[int, str]:
    base = path.split("-")[0]
    return (ORDER.index(base) if base in ORDER else 99, path)


def nines(percent: float) -> float:
    """-log10(1 - p): 90% -> 1, 99% -> 2, 99.9% -> 3, so the tail gets the room it needs."""
    return -math.log10(max(1e-6, 1 - percent / 100))


def cdf(runs: list[dict], mode: str, out: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    paths = sorted({r["path"] for r in runs if r["mode"] == mode}, key=order)
    for path in paths:
        selected = [r for r in runs if r["path"] == path and r["mode"] == mode]
        keys = sorted({float(k) for r in selected for k in r["percentiles"]})
        xs, ys = [], []
        for k in keys:
            values = [r["percentiles"].get(str(k)) for r in selected]
            values = [v for v in values if v is not None and v == v]
            if values:
                xs.append(statistics.median(values))
                ys.append(nines(k))
        ax.plot(xs, ys, label=path, linewidth=1.6)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ticks = [0, 50, 90, 99, 99.9, 99.99]
    ax.set_yticks([nines(t) for t in ticks], [f"{t:g}%" for t in ticks])
    ax.set_ylabel("percentile (tail stretched)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def cpu_bars(runs: list[dict], out: Path) -> None:
    paths = sorted({r["path"] for r in runs if r["mode"] == "c64"}, key=order)
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, path in enumerate(paths):
        selected = [r for r in runs if r["path"] == path and r["mode"] == "c64"]
        for j, key in enumerate(("cpu_ms_per_request", "cpu_settled_ms_per_request")):
            values = [r[key] for r in selected if r.get(key) is not None]
            if not values:
                continue
            m = statistics.median(values)
            err = [[m - min(values)], [max(values) - m]]
            label = "hot path" if j == 0 else "with settlement"
            color = "tab:blue" if j == 0 else "tab:orange"
            ax.bar(i + (j - 0.5) * 0.38, m, width=0.36, yerr=err, capsize=3, color=color, label=label)
            ax.text(i + (j - 0.5) * 0.38, m, f"{m:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(paths)), paths)
    ax.set_ylabel("CPU ms per request (proxy process, 64 connections)")
    ax.set_title("CPU per request by path (median, min–max over rounds)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    ax.legend(unique.values(), unique.keys())
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    data = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    runs = [r for r in data["runs"] if not r.get("skipped")]
    cdf(runs, "c1", out / "latency-cdf-c1.png", "Latency CDF, closed loop, 1 connection")
    cdf(runs, "c64", out / "latency-cdf-c64.png", "Latency CDF, closed loop, 64 connections")
    cpu_bars(runs, out / "cpu-per-request.png")


if __name__ == "__main__":
    main()
