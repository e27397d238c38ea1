"""Is a process (of this host) still the one that wrote a lock or made a work folder?

A pid alone is not enough: pids are reused. Owners also record their process start time,
and a live pid that started at another time is another process.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path


def process_start(pid: int) -> float | None:
    """Start time of a process (seconds since the epoch), from /proc; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rpartition(")")[2].split()[19])  # field 22, starttime
        return _boot_time() + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@cache
def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise ValueError("no btime in /proc/stat")


def process_alive(pid: int, started: float | None = None) -> bool:
    """Whether pid runs, and (when `started` is known on both sides) is the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if started is None:
        return True
    now_started = process_start(pid)
    return now_started is None or abs(now_started - started) < 2.0
