"""Read the server process's CPU time and memory.

CPU time comes from ``/proc/PID/task/*/schedstat`` (nanoseconds on the CPU, all threads)
where Linux provides it, since ``/proc/PID/stat`` counts in 10 ms ticks; psutil otherwise.
"""

from __future__ import annotations

import os

import psutil


def _schedstat_seconds(pid: int) -> float | None:
    base = f"/proc/{pid}/task"
    try:
        tasks = os.listdir(base)
    except OSError:
        return None
    total = 0
    for tid in tasks:
        try:
            with open(f"{base}/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


class ServerProbe:
    """CPU seconds (user + system) and RSS of the server under test."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._ps = psutil.Process(pid)
        self._precise = _schedstat_seconds(pid) is not None

    def cpu(self) -> float:
        if self._precise:
            value = _schedstat_seconds(self._pid)
            if value is not None:
                return value
        t = self._ps.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self._ps.memory_info().rss)
