"""The benchmark's own instruments, where a wrong reading would print a wrong table without failing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest

from services.metrics.registry import Metrics
from tests.bench import instructions
from tests.bench.instructions import Counting, parse_total
from tests.bench.lease_grants import TOKEN_FILE, GrantProbe

# `callgrind_control -e Ir <pid>` of a process with two threads (valgrind 3.19); its lines end in a space.
STATUS = "PID 10217: python -m services serve\n\n  Totals:        Ir \n   Th 1  26,733,686 \n   Th 2       1,204 \n\n"

# Sums what it is told on stdin, one line at a time, and says when it is done.
WORKER = "import sys\nfor line in sys.stdin:\n    sum(range(int(line)))\n    print('done', flush=True)\n"


@pytest.mark.unit
def test_the_instruction_count_is_every_threads_sum() -> None:
    assert parse_total(STATUS) == 26_734_890


@pytest.mark.unit
def test_totals_without_a_thread_are_zero() -> None:
    # What callgrind_control prints when nothing ran since the counters were zeroed.
    assert parse_total("PID 10217: python\n\n  Totals:Ir \n\n") == 0


@pytest.mark.unit
def test_a_status_without_counts_is_an_error_not_zero() -> None:
    # What callgrind_control prints while counting is off: reading it as 0 would halve a ratio silently.
    with pytest.raises(ValueError, match="no instruction count"):
        parse_total("PID 10217: python\n  No information available as instrumentation is switched off.\n")


@pytest.mark.skipif(bool(instructions.missing()), reason="needs valgrind (Debian's package), as --instructions does")
def test_counting_counts_the_work_between_start_and_stop_only(tmp_path: Path) -> None:
    # The interpreter itself, not a launcher script: valgrind follows no exec.
    proc = subprocess.Popen(
        [*instructions.wrapper(tmp_path), sys.executable, "-c", WORKER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    stdin, stdout = proc.stdin, proc.stdout
    assert stdin is not None
    assert stdout is not None

    def work(n: int) -> None:
        stdin.write(f"{n}\n")
        stdin.flush()
        assert stdout.readline().strip() == "done"

    try:
        work(10)  # started, and waiting on its stdin: where callgrind_control reaches a gateway too
        counting = Counting(proc.pid)
        measured = []
        for n in (200_000, 400_000):
            counting.start()
            work(n)
            measured.append(counting.stop())
        work(2_000_000)  # not counted: counting is off again
        counting.start()
        idle = counting.stop()
    finally:
        proc.kill()
        proc.wait()
    one, two = measured
    assert one > 200_000 * 5, "at least a few instructions per number summed"
    assert 1.8 < two / one < 2.2, measured
    assert idle < one / 10, (idle, measured)


@pytest.mark.unit
async def test_the_lease_grant_probe_reads_a_gateways_own_counter(tmp_path: Path) -> None:
    """The hotpath benchmark's lease statements come from the gateway's /metrics, by what ran short."""
    metrics = Metrics()
    metrics.lease_grants.labels("slots").inc(3)
    metrics.lease_grants.labels("requests").inc()
    (tmp_path / TOKEN_FILE).write_text("secret\n")

    def serve(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != "Bearer secret":
            return httpx.Response(401)
        return httpx.Response(200, content=generate_latest(metrics.registry))

    probe = GrantProbe("http://gw", tmp_path)
    async with httpx.AsyncClient(transport=httpx.MockTransport(serve)) as client:
        before = await probe.snapshot(client)
        assert before == {"requests": 1.0, "tokens": 0.0, "slots": 3.0, "none": 0.0, "ahead": 0.0}
        metrics.lease_grants.labels("slots").inc()
        assert GrantProbe.used(before, await probe.snapshot(client)) == {
            "requests": 0.0,
            "tokens": 0.0,
            "slots": 1.0,
            "none": 0.0,
            "ahead": 0.0,
        }
        (tmp_path / TOKEN_FILE).write_text("wrong")
        assert await probe.snapshot(client) is None, "an unreadable /metrics is no figure, not zero"
