"""Instructions a process executes, counted by valgrind's callgrind: a CPU measure the machine's drift does not move.

Seconds of CPU per request drift by a third within an hour on a shared machine, so
a change of a few percent needs many paired rounds (versus.py) and often stays
inside their noise. Instructions do not drift: the same code on the same requests
executes nearly the same count, whatever else the machine is doing. A gateway run
under callgrind (`WRAPPER`) starts with counting off, so its start-up and the
warm-up cost nothing extra; `Counting` counts one round's instructions.

Under callgrind a process runs about 50 times slower while it counts: the counts
are the code's, its timings are not (nothing here reads them). Only user space is
counted: the kernel's work in a system call is not (count those apart).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

_TOOLS = ("valgrind", "callgrind_control")
# A thread's count in `callgrind_control -e Ir`: "   Th 1  26,733,686".
_THREAD_COUNT = re.compile(r"^\s*Th\s+\d+\s+([\d,]+)\s*$", re.MULTILINE)


def missing() -> list[str]:
    """The tools this needs that are not on PATH (Debian's valgrind package has both)."""
    return [tool for tool in _TOOLS if shutil.which(tool) is None]


def wrapper(out_dir: Path) -> tuple[str, ...]:
    """What to run a process under: callgrind, counting nothing until `Counting.start`."""
    return (
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        # Its profile at exit (unused: the counts are read while it runs), kept out of the working directory.
        f"--callgrind-out-file={out_dir / 'callgrind.out.%p'}",
    )


def _control(pid: int, *args: str) -> str:
    # callgrind_control reaches the process through valgrind's gdbserver, also while it waits in a system call.
    done = subprocess.run(
        ["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0 or "not detected" in done.stdout + done.stderr:
        raise RuntimeError(f"callgrind_control {' '.join(args)} {pid}: {(done.stdout + done.stderr).strip()[:300]}")
    return done.stdout


def parse_total(status: str) -> int:
    """The instructions of every thread in `callgrind_control -e Ir` output (ValueError if it has no totals:
    counting was off). A thread that executed nothing since the counters were zeroed is not listed."""
    if "Totals:" not in status:
        raise ValueError(f"no instruction count in {status.strip()[:300]!r}")
    return sum(int(c.replace(",", "")) for c in _THREAD_COUNT.findall(status))


class Counting:
    """Counting one process's instructions between `start` and `stop` (it must run under `wrapper`)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def start(self) -> None:
        _control(self.pid, "--instr=on")
        _control(self.pid, "--zero")

    def stop(self) -> int:
        """The instructions executed since `start`; counting is off again."""
        try:
            return parse_total(_control(self.pid, "-e", "Ir"))
        finally:
            _control(self.pid, "--instr=off")
