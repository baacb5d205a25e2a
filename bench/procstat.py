"""CPU accounting of the benchmarked processes, read from /proc (Linux only).

`cpu_seconds(pid)` is utime + stime of a process and all its descendants, every thread included
(`/proc/<pid>/stat` sums a process's live and exited threads), at the kernel's tick resolution;
the benchmark reads it before and after each measured window. `precise_cpu_seconds(pid)` sums the
scheduler's nanosecond run time of every live thread (`/proc/<pid>/task/*/schedstat`): the idle
measurement uses it, since a quiet process accrues too few ticks to count. Over a window,
`machine_busy_seconds()` minus `own_seconds()` is the CPU that processes outside the benchmark took
meanwhile (another user of this shared machine): the noise to report. `LockSleeps` counts the
relay's relative-time sleeps during a window (in the relay these are SQLite's busy-handler sleeps)
with `perf stat` on the kernel's syscall tracepoints: a counter in the kernel, so nothing stops or
slows the relay. (strace did: even limited by seccomp-bpf to the sleep calls, ptrace made the
traced relay's calls 1.5–2.5× as costly as the untraced ones in an A/B, and skewed every ratio.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (a snapshot)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """utime + stime (seconds) of `pid`, with its descendants when `tree`."""
    total = 0
    for p in descendants(pid) if tree else [pid]:
        fields = _stat_fields(p)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICK


def precise_cpu_seconds(pid: int, tree: bool = True) -> float:
    """Run time (seconds, ns resolution) of the live threads of `pid` (and descendants)."""
    total = 0
    for p in descendants(pid) if tree else [pid]:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                total += int(Path(f"/proc/{p}/task/{task}/schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    return total / 1e9


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / TICK


def own_seconds() -> float:
    """CPU of this process, its reaped children (cutime/cstime) and its live descendants."""
    fields = _stat_fields(os.getpid())
    assert fields is not None
    own = sum(int(x) for x in fields[11:15]) / TICK  # utime, stime, cutime, cstime
    return own + sum(cpu_seconds(p, tree=False) for p in descendants(os.getpid())[1:])


def threads(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[17]) if fields else 0


class LockSleeps:
    """Relative-time sleeps of a process and its threads while counting (`start` … `stop`).

    SQLite's busy handler sleeps through usleep (glibc: `clock_nanosleep` with no flags, or
    `nanosleep`); Python's `time.sleep` sleeps until an absolute time (`TIMER_ABSTIME`): not counted."""

    EVENTS = (
        "-e", "syscalls:sys_enter_clock_nanosleep", "--filter", "flags == 0",
        "-e", "syscalls:sys_enter_nanosleep",
    )  # fmt: skip

    def __init__(self, pid: int, log: Path) -> None:
        self.log = log
        argv = ["perf", "stat", "-x", ",", "-o", str(log), *self.EVENTS, "-p", str(pid)]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def available() -> bool:
        """Whether `perf` may count syscall tracepoints here (root, or a permissive
        perf_event_paranoid, and tracefs)."""
        if shutil.which("perf") is None:
            return False
        probe = subprocess.run(
            ["perf", "stat", "-x", ",", *LockSleeps.EVENTS, "--", "true"], capture_output=True, text=True
        )
        return probe.returncode == 0

    def stop(self) -> int:
        """Stops counting; the sleeps counted."""
        self.process.send_signal(signal.SIGINT)
        _, err = self.process.communicate(timeout=30)
        total = 0
        for line in self.log.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2].startswith("syscalls:"):
                if not fields[0].isdigit():
                    raise RuntimeError(f"perf could not count {fields[2]}: {line} {err.strip()[-300:]}")
                total += int(fields[0])
        return total
