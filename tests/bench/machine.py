"""The machine a run measured on, as the tables state it: everything a benchmark starts shares its cores."""

from __future__ import annotations

import os
import platform


def cores() -> str:
    total = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        usable = total
    return f"{usable} CPU cores" + ("" if usable == total else f" usable (of {total})")


def load_average() -> float:
    """The machine's 1-minute load average: how much else (besides this benchmark) wants the cores."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine_lines(sharing: str) -> list[str]:
    """A header's last two lines: the cores and platform, and `sharing`, what of the run shares them."""
    return [
        f"machine: {cores()}, {platform.system()} {platform.machine()}, Python {platform.python_version()};",
        f"         {sharing} all share these cores",
    ]
