"""How many CPU threads a run should use: the cores that are idle now, not all of them.

torch uses one intra-op thread per core by default. On a machine where another process keeps a core busy, two
threads on two cores run every parallel operation at the pace of the thread that waits for the busy core: the
quickstart took 4 min 20 s that way on 2 cores with one busy, against 2 min 12 s with one thread
(PERFORMANCE.md, "Quickstart"). :func:`idle_cores` measures the idle cores from ``/proc/stat`` (Linux) over a
short window; :func:`choose_threads` turns that into a thread count, and leaves an explicit choice alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["idle_cores", "choose_threads"]


def _cpu_times(stat: Path) -> tuple[float, float]:
    """(idle, total) jiffies of all cores from the first line of ``/proc/stat``."""
    fields = [float(x) for x in stat.read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return idle, sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)


def idle_cores(window: float = 0.3, stat: str | Path = "/proc/stat") -> float | None:
    """The number of cores idle over the next ``window`` seconds (e.g. 1.0 of 2 when another process spins one),
    or None where ``/proc/stat`` cannot be read (not Linux)."""
    path = Path(stat)
    try:
        idle0, total0 = _cpu_times(path)
        time.sleep(window)
        idle1, total1 = _cpu_times(path)
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (idle1 - idle0) / (total1 - total0)


def choose_threads(requested: int | None, default: int, idle: float | None) -> int:
    """The intra-op thread count: ``requested`` when given, else the idle cores (rounded, at least 1, at most
    ``default``, torch's own choice); ``default`` when the idle cores are unknown."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--cpu_threads must be >= 1, got {requested}")
        return requested
    if idle is None:
        return default
    return max(1, min(default, int(idle + 0.5)))
