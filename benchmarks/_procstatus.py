"""Memory readings from ``/proc/self/status`` shared by the memory benchmarks (Linux only)."""

from __future__ import annotations

from pathlib import Path


def status_mb(field: str) -> float:
    """One ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM, RssAnon, …) in MB; nan where the kernel
    lacks it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")
