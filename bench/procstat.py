"""CPU accounting of the benchmarked processes, read from /proc (Linux only).

`cpu_seconds(pid)` is utime + stime of a process and all its descendants, every thread included
(`/proc/<pid>/stat` sums a process's live and exited threads), at the kernel's tick resolution;
the benchmark reads it before and after each measured window. `precise_cpu_seconds(pid)` sums
the scheduler's nanosecond run time of every live thread (`/proc/<pid>/task/*/schedstat`): the
idle measurement uses it, since a quiet process accrues too few ticks to count. `LockSleeps`
reads the strace log of the relay (nanosleep/clock_nanosleep calls only, traced through
seccomp-bpf so that nothing else stops): in the relay these are SQLite's busy-handler sleeps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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

    def timestamps(self) -> list[float]:
        if not self.log.exists():
            return []
        stamps = []
        for line in self.log.read_text(errors="replace").splitlines():
            parts = line.split(None, 2)
            # SQLite's busy handler sleeps for a relative time (usleep); Python's time.sleep
            # sleeps until an absolute CLOCK_MONOTONIC time (TIMER_ABSTIME): not counted.
            if len(parts) == 3 and "sleep(" in parts[2] and "TIMER_ABSTIME" not in parts[2]:
                try:
                    stamps.append(float(parts[1]))
                except ValueError:
                    continue
        return stamps

    @staticmethod
    def strace_argv(log: Path) -> list[str]:
        return [
            "strace", "-f", "-qq", "--seccomp-bpf", "-ttt", "-e", "trace=nanosleep,clock_nanosleep",
            "-e", "signal=none", "-o", str(log), "--",
        ]  # fmt: skip
