"""py-spy profiles of a benchmarked process, for the optimiser's before/after comparisons.

`record(pid, name, fmt, seconds, load, out_dir)` starts `py-spy record` (pinned in the bench tools'
environment by bench/requirements-tools.txt) against the process, runs the load while it samples,
and writes bench/results/profiles/<name>.svg (flamegraph) or <name>.speedscope.json (open it at
speedscope.app or with the speedscope CLI). `--nonblocking` reads the process's memory without
pausing it; `--subprocesses` includes workers a proxy may fork. Returns the file written (None on
failure) and the load's result.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from proxies import CACHE

PY_SPY = CACHE / "tools" / "bin" / "py-spy"
T = TypeVar("T")


def record(
    pid: int, name: str, fmt: str, seconds: float, load: Callable[[], T], out_dir: Path
) -> tuple[Path | None, T]:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (f"{name}.svg" if fmt == "flamegraph" else f"{name}.speedscope.json")
    argv = [
        str(PY_SPY), "record", "--pid", str(pid), "--duration", str(round(seconds)), "--rate", "250",
        "--nonblocking", "--subprocesses", "--format", fmt, "--output", str(out),
    ]  # fmt: skip
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    result = load()
    try:
        _, err = spy.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if spy.returncode != 0 or not out.exists():
        print(f"[bench] py-spy failed on {name}: {err.strip()[-300:]}")
        return None, result
    return out, result
