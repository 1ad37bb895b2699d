"""Facts about this machine: chip, memory, a memory-bandwidth estimate, process sizes.

Decode speed on Apple silicon is bound by memory bandwidth (every token reads
all the weights once), so the chip's bandwidth is what predicts tokens/s.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass

# Unified-memory bandwidth of Apple chips in GB/s (Apple's published figures; the
# fastest configuration of each chip, binned parts are a little slower).
APPLE_BANDWIDTH_GBS: dict[str, float] = {
    "M1": 68.25,
    "M1 Pro": 200,
    "M1 Max": 400,
    "M1 Ultra": 800,
    "M2": 100,
    "M2 Pro": 200,
    "M2 Max": 400,
    "M2 Ultra": 800,
    "M3": 100,
    "M3 Pro": 150,
    "M3 Max": 400,
    "M3 Ultra": 819,
    "M4": 120,
    "M4 Pro": 273,
    "M4 Max": 546,
    "M5": 153,
}

# Common Macs, for the fit matrix: (chip, unified memory in GB).
COMMON_SKUS: tuple[tuple[str, int], ...] = (
    ("M1", 8),
    ("M1", 16),
    ("M2", 16),
    ("M2 Pro", 32),
    ("M3", 24),
    ("M3 Max", 64),
    ("M4", 16),
    ("M4", 32),
    ("M4 Pro", 24),
    ("M4 Pro", 48),
    ("M4 Max", 64),
    ("M4 Max", 128),
    ("M2 Ultra", 192),
    ("M3 Ultra", 512),
)

# A guess for machines we cannot name (Linux CPUs): dual-channel DDR4/DDR5 territory.
UNKNOWN_BANDWIDTH_GBS = 40.0


@dataclass(frozen=True, slots=True)
class Machine:
    system: str
    chip: str
    ram_bytes: int
    bandwidth_gbs: float
    # True when the bandwidth comes from the table above, False when it is a guess.
    bandwidth_known: bool
    cpu_count: int


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def apple_chip_name(brand: str) -> str | None:
    """'Apple M2 Pro' -> 'M2 Pro'; None when it is not an Apple chip."""
    m = re.search(r"\b(M\d+)(?:\s+(Pro|Max|Ultra))?\b", brand)
    if not brand.startswith("Apple") or m is None:
        return None
    return m.group(1) + (f" {m.group(2)}" if m.group(2) else "")


def bandwidth_for(chip: str) -> float | None:
    return APPLE_BANDWIDTH_GBS.get(chip)


def ram_bytes() -> int:
    if platform.system() == "Darwin":
        raw = _sysctl("hw.memsize")
        return int(raw) if raw.isdigit() else 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def available_bytes() -> int:
    """Memory the system could give to new work now (0 when unknown): the pool's headroom figure."""
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        page = 16384
        pages = 0
        for line in out.splitlines():
            if line.startswith("Mach Virtual Memory Statistics") and "page size of" in line:
                page = int(line.split("page size of")[1].split()[0])
            elif line.startswith(("Pages free:", "Pages inactive:", "Pages speculative:", "Pages purgeable:")):
                pages += int(line.split(":")[1].strip().rstrip("."))
        return pages * page
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def detect() -> Machine:
    system = platform.system()
    if system == "Darwin":
        brand = _sysctl("machdep.cpu.brand_string")
        chip = apple_chip_name(brand) or brand or platform.machine()
    else:
        brand = ""
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        brand = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        chip = brand or platform.machine()
    known = bandwidth_for(chip)
    return Machine(
        system=system,
        chip=chip,
        ram_bytes=ram_bytes(),
        bandwidth_gbs=known if known is not None else UNKNOWN_BANDWIDTH_GBS,
        bandwidth_known=known is not None,
        cpu_count=os.cpu_count() or 1,
    )


def process_rss(pid: int) -> int:
    """Resident bytes of a process (0 when it is gone or unknown)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0
    except FileNotFoundError:
        if platform.system() != "Darwin":
            return 0
    except (OSError, ValueError):
        return 0
    try:
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=5).stdout
        return int(out.strip() or 0) * 1024
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0
