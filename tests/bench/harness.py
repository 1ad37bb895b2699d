"""One benchmark run around its stack, the same for every mode that starts the product's servers.

A scratch directory; the stack started and always stopped (also on Ctrl-C or
SIGTERM); its logs kept when a post-mortem needs them (or --keep), removed
otherwise; the table printed with the run's length (and, where asked, the
machine's load) under its footer; and the exit status.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

import uvloop

from tests.bench.machine import load_average, speed_ms
from tests.bench.progress import say


class Startable(Protocol):
    """What a run starts and stops around its measurements (tests/bench/stack.py's Stack, the cluster)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=Startable)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a run's results say about the run itself."""

    # Some measured request (or round) failed: exit 1 with --strict.
    failed: bool
    # Which part of the run measured nothing (e.g. "no request succeeded at some level"), or None: exit 1.
    hollow: str | None = None
    # What failed, in the messages: "requests" or "rounds".
    unit: str = "requests"
    # Keep the logs when anything failed, not only when a part is hollow (a failed round is rare and telling).
    keep_failed_logs: bool = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # `kill` ends a run the way Ctrl-C does: its stack is stopped and its scratch directory removed.
    raise KeyboardInterrupt


def run(
    *,
    prefix: str,
    stack: Callable[[Path], S],
    measure: Callable[[S], Coroutine[Any, Any, T]],
    verdict: Callable[[T], Verdict],
    table: Callable[[T, list[str]], str],
    keep_logs: bool,
    strict: bool,
    load_line: bool = False,
    fast_loop: bool = False,
) -> int:
    """Start `stack(home)`, `measure` it, stop it; print `table(result, footer lines about the run)`.

    Returns the exit status: 130 if interrupted, 1 if the verdict says so, else 0.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix=prefix))
    servers = stack(home)
    load_before = load_average()
    speed_before = speed_ms() if load_line else 0.0
    # Logs stay for a post-mortem when the run fails; a finished or interrupted run cleans up.
    keep = True
    try:
        say(f"scratch directory {home}")
        servers.start()
        # uvloop where the load's own CPU is part of what the machine has to share (hotpath).
        result = (uvloop.run if fast_loop else asyncio.run)(measure(servers))
        outcome = verdict(result)
        keep = keep_logs or outcome.hollow is not None or (outcome.keep_failed_logs and outcome.failed)
    except KeyboardInterrupt:
        say("interrupted")
        keep = keep_logs
        return 130
    finally:
        servers.stop()
        if keep:
            say(f"logs kept in {home}/logs")
        else:
            shutil.rmtree(home, ignore_errors=True)
    whole = f"(whole run incl. starting and stopping the stack: {time.monotonic() - started:.0f}s"
    footer = [f"{whole})"]
    if load_line:
        # Other work on a shared machine moves the numbers: say how busy it was.
        load = f"load average: {load_before:.1f} before, {load_average():.1f} after"
        footer = [
            f"{whole}; the machine's 1-minute",
            f"{load}: any other work competes for the cores;",
            f"a fixed workload (JSON and socket round trips) took {speed_before:.1f} ms before, {speed_ms():.1f} ms",
            "after: figures of two runs compare only where these agree)",
        ]
    print(table(result, footer), flush=True)
    if outcome.hollow is not None:
        say(f"{outcome.hollow} (see 'failed {outcome.unit}' above and the logs); exit 1")
        return 1
    if strict and outcome.failed:
        say(f"--strict: some {outcome.unit} failed; exit 1")
        return 1
    return 0
