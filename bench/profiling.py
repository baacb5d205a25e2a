"""py-spy profiles of a benchmarked process, for the optimiser's before/after comparisons.

`record(pid, name, fmt, seconds, load, out_dir)` starts `py-spy record` (pinned in the bench tools'
environment by bench/requirements-tools.txt) against the process, runs the load while it samples,
and writes bench/results/profiles/<name>.svg (flamegraph) or <name>.speedscope.json (open it at
speedscope.app or with the speedscope CLI). `--nonblocking` reads the process's memory without
pausing it; `--subprocesses` includes workers a proxy may fork. Returns the file written (None on
failure) and the load's result. `breakdown(speedscope_file)` sums a profile's samples per thread
and, for the event loop's thread, per component: the report's "Where the time goes" tables.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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


# The event loop's samples by component: the first rule a sample's stack matches (any frame for
# the background work, the innermost frame for the rest). Waiting for the GIL counts where it
# waits: py-spy's default (wall-clock) sampling sees a thread that waits for the GIL as active.
_BACKGROUND = (("settlement worker and indexer", ("/payments/settlement.py", "/payments/indexer.py")),)
_INNERMOST = (
    ("event loop (uvloop; includes waiting for the GIL)", ("asyncio/runners.py", "uvloop")),
    ("HTTP server (uvicorn, httptools)", ("/uvicorn/", "/httptools/")),
    ("Starlette and FastAPI (routing, middleware, dependencies)", ("/starlette/", "/fastapi/")),
    ("body and response models (pydantic)", ("/pydantic",)),
    ("upstream and chain HTTP (aiohttp)", ("/aiohttp/", "/multidict/", "/yarl/")),
    ("ECDSA (coincurve: x402 recovery, receipts)", ("/coincurve/",)),
    ("keccak (pycryptodome, if eth-hash uses it)", ("/Crypto/",)),
    ("ABI, keccak, addresses (eth_abi, eth_utils, eth_hash)", ("/eth_abi/", "/eth_utils/", "/eth_hash/")),
    ("web3 (transactions sent, logs)", ("/web3/", "/eth_account/", "/hexbytes/")),
    ("SQLAlchemy (ORM reads, the call path's statement setup)", ("/sqlalchemy/",)),
    ("the relay's own code (quotra)", ("/quotra/",)),
)


def breakdown(path: Path) -> dict[str, Any]:
    """Seconds sampled per thread, and the event loop's share per component, of a speedscope file."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    threads: dict[str, float] = {}
    loop: Counter[str] = Counter()
    for profile in data["profiles"]:
        name = profile.get("name", "").split('"')[1] if '"' in profile.get("name", "") else "?"
        threads[name] = threads.get(name, 0.0) + sum(profile["weights"])
        if name != "MainThread":
            continue
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            files = [frames[i].get("file", "") for i in stack]
            loop[_component(files)] += weight
    total = sum(loop.values()) or 1.0
    return {
        "threads": dict(sorted(threads.items(), key=lambda kv: -kv[1])),
        "loop": [(name, seconds / total) for name, seconds in loop.most_common()],
    }


def _component(files: list[str]) -> str:
    for name, parts in _BACKGROUND:
        if any(part in f for f in files for part in parts):
            return name
    innermost = files[-1] if files else ""
    for name, parts in _INNERMOST:
        if any(part in innermost for part in parts):
            return name
    return "other (standard library, logging, JSON)"
