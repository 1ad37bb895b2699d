"""The machine a run measured on, as the tables state it: everything a benchmark starts shares its cores."""

from __future__ import annotations

import os
import platform
import socket
import statistics
import time

import msgspec


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


class _Chunk(msgspec.Struct):
    id: str
    index: int
    text: str
    logprobs: list[float]


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(_Chunk)


def _workload(a: socket.socket, b: socket.socket) -> int:
    # What a gateway does most: small objects, dicts, strings, JSON in and out, and a socket write and
    # read for each (system calls cost more on some hosts than others).
    total = 0
    for i in range(5_000):
        chunk = _Chunk(f"chatcmpl-{i}", i, "token " * (i % 7), [0.5] * (i % 5))
        data = _ENCODER.encode(chunk)
        headers = {"x-request-id": chunk.id, "content-length": str(len(data))}
        a.send(data)
        total += len(_DECODER.decode(b.recv(4096)).text) + len(headers)
    return total


def speed_ms(rounds: int = 15) -> float:
    """Milliseconds a fixed Python workload takes here now (median of `rounds`): lower is faster.

    This box's speed drifts by a third within an hour (other tenants of its host); two runs' figures
    compare only where this agrees.
    """
    times = []
    a, b = socket.socketpair()
    with a, b:
        for _ in range(rounds):
            started = time.perf_counter()
            _workload(a, b)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def machine_lines(sharing: str) -> list[str]:
    """A header's last two lines: the cores and platform, and `sharing`, what of the run shares them."""
    return [
        f"machine: {cores()}, {platform.system()} {platform.machine()}, Python {platform.python_version()};",
        f"         {sharing} all share these cores",
    ]
