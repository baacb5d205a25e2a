"""CPU accounting of the benchmarked processes, read from /proc (Linux only).

`cpu_seconds(pid)` is utime + stime of a process and all its descendants, every thread included
(`/proc/<pid>/stat` sums a process's live and exited threads), at the kernel's tick resolution;
the benchmark reads it before and after each measured window. `precise_cpu_seconds(pid)` sums the
scheduler's nanosecond run time of every live thread (`/proc/<pid>/task/*/schedstat`): the idle
measurement uses it, since a quiet process accrues too few ticks to count. Over a window,
`machine_busy_seconds()` minus `own_seconds()` is the CPU that processes outside the benchmark took
meanwhile (another user of this shared machine): the noise to report. `LockSleeps` reads the
strace log of the relay (nanosleep/clock_nanosleep calls only, traced through seccomp-bpf so that
nothing else stops): in the relay these are SQLite's busy-handler sleeps.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
_DURATION = re.compile(r"tv_sec=(\d+), tv_nsec=(\d+)")


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


def child_of(pid: int) -> int | None:
    """The first child process of `pid` (the program a wrapper such as strace started)."""
    for p in descendants(pid)[1:]:
        fields = _stat_fields(p)
        if fields is not None and int(fields[1]) == pid:
            return p
    return None


@dataclass
class LockSleeps:
    """Sleep syscalls in an strace log written with `-ttt` (wall-clock timestamps)."""

    log: Path

    def sleeps(self) -> list[tuple[float, float]]:
        """(wall-clock time, seconds asked for) of each relative sleep."""
        if not self.log.exists():
            return []
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            parts = line.split(None, 2)
            # SQLite's busy handler sleeps for a relative time (usleep: 1, 2, 5, … 100 ms); Python's
            # time.sleep sleeps until an absolute CLOCK_MONOTONIC time (TIMER_ABSTIME): not counted.
            if len(parts) == 3 and "sleep(" in parts[2] and "TIMER_ABSTIME" not in parts[2]:
                match = _DURATION.search(parts[2])
                try:
                    at = float(parts[1])
                except ValueError:
                    continue
                found.append((at, int(match.group(1)) + int(match.group(2)) / 1e9 if match else 0.0))
        return found

    @staticmethod
    def strace_argv(log: Path) -> list[str]:
        return [
            "strace", "-f", "-qq", "--seccomp-bpf", "-ttt", "-e", "trace=nanosleep,clock_nanosleep",
            "-e", "signal=none", "-o", str(log), "--",
        ]  # fmt: skip
