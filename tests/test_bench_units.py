"""The benchmark's own instruments, where a wrong reading would print a wrong table without failing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import msgspec
import pytest
from prometheus_client import generate_latest

from services.metrics.registry import Metrics
from tests.bench import hotpath, instructions
from tests.bench.instructions import Counting, parse_total
from tests.bench.lean_http import LeanClients
from tests.bench.lease_grants import TOKEN_FILE, GrantProbe
from tests.bench.load import Level, Sample, ViaGateway

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


# ---- the lean load client (tests/bench/lean_http.py) -------------------------------------------


def _sse(*events: bytes) -> bytes:
    """A chunked SSE body, each event its own HTTP chunk, the terminating chunk at the end."""
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def _chunk(content: str | None = None, finish: str | None = None, usage: int | None = None) -> bytes:
    body: dict[str, object] = {"choices": [{"delta": {"content": content}, "finish_reason": finish}]}
    if usage is not None:
        body = {"choices": [], "usage": {"completion_tokens": usage}}
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


class _Server:
    """A hand-written HTTP/1.1 server: each request is answered with the next of `answers` (raw bytes,
    written in the pieces given, a pause between them); it counts the connections it accepted."""

    def __init__(self, answers: list[list[bytes]]) -> None:
        self.answers = answers
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
                )
                self.requests.append(head + await reader.readexactly(length))
                for piece in self.answers.pop(0):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                if b"connection: close" in head.lower() or not self.answers:
                    break
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()


async def test_the_lean_client_reads_a_stream_as_it_arrives_and_checks_it() -> None:
    head = b"HTTP/1.1 200 OK\r\nx-request-id: req_1\r\ntransfer-encoding: chunked\r\n\r\n"
    body = _sse(_chunk("Hel"), _chunk("lo"), _chunk(None, "length"), _chunk(usage=3), b"data: [DONE]\n\n")
    # The body arrives in pieces that end mid-chunk and mid-event: the second token comes 10 ms after the first.
    cut = body.index(b"lo") - 3
    error = b'{"error":{"message":"slow down","type":"rate_limit_error","code":"rate_limited"}}'
    refusal = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: %d\r\nx-request-id: req_2\r\n\r\n%s" % (
        len(error),
        error,
    )
    server = _Server([[head, body[:cut], body[cut:]], [refusal]])
    async with server as url, LeanClients() as clients:
        send = ViaGateway(clients, url, "mp_test", "m", 3)
        ok = await send(0)
        refused = await send(0)
    assert (ok.error, ok.tokens, ok.chunks, ok.request_id) == (None, 3, 2, "req_1")
    assert ok.first is not None
    assert ok.last is not None
    assert ok.last - ok.first >= 0.005
    assert (refused.error, refused.request_id) == ("http_429:rate_limited", "req_2")
    assert server.connections == 1, "the connection was kept alive"
    sent = server.requests[0]
    assert sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"authorization: Bearer mp_test\r\n" in sent
    assert msgspec.json.decode(sent.split(b"\r\n\r\n", 1)[1])["stream"] is True


async def test_the_lean_client_finds_a_short_stream_and_a_closed_connection() -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    # No [DONE]: an answer cut short is a failed request, not a fast one.
    short = _sse(_chunk("Hel"), _chunk(None, "length"), _chunk(usage=3))
    whole = b'{"choices":[{"message":{"content":"Hello"},"finish_reason":"length"}],"usage":{"completion_tokens":3}}'
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(whole), whole)
    server = _Server([[head, short], [closing], [closing]])
    async with server as url, LeanClients() as clients:
        assert (await ViaGateway(clients, url, "k", "m", 3)(0)).error == "no_done_marker"
        whole_send = ViaGateway(clients, url, "k", "m", 3, stream=False)
        first, second = await whole_send(0), await whole_send(0)
    assert (first.error, first.tokens) == (None, 3)
    # The server said it closes: the next request opened a connection of its own.
    assert (second.error, server.connections) == (None, 2)


@pytest.mark.unit
def test_hotpath_runs_metering_on_and_off_back_to_back_each_first_in_turn() -> None:
    names = [hotpath.DIRECT_HTTP, *hotpath.SERIES, hotpath.PG_SERIES]
    off, on = hotpath.SERIES[0], hotpath.SERIES[1]
    for r in range(6):
        rotated = names[r % len(names) :] + names[: r % len(names)]
        order = hotpath._paired(rotated, r)
        assert sorted(order) == sorted(names), "every series once"
        at = order.index(off)
        assert order[at + 1 if r % 2 == 0 else at - 1] == on, (r, order)
        # The others keep the rotation's order.
        assert [s for s in order if s != on] == [s for s in rotated if s != on]


def _tally(*rates: float) -> hotpath.Tally:
    """One level per round: 100 successful requests in 100 / rate seconds."""
    levels = []
    for rate in rates:
        samples = [Sample(start=0.0, end=0.001) for _ in range(100)]
        levels.append(Level(concurrency=16, samples=samples, wall_s=100 / rate, cpu_s=0.0))
    return hotpath.Tally(levels=levels)


@pytest.mark.unit
def test_hotpath_judges_metering_on_off_by_the_median_of_paired_rounds_and_shows_the_pooled_ratio() -> None:
    # The fourth round's metering-off series fell in a slow spell: pooled, it drags the whole run's ratio.
    off = _tally(1000, 1000, 1000, 400, 1000)
    on = _tally(950, 940, 960, 930, 920)
    assert hotpath.paired_ratios(on, off) == pytest.approx([0.95, 0.94, 0.96, 2.325, 0.92])
    pooled = 5 * 100 / sum(100 / r for r in (950, 940, 960, 930, 920)) / (5 * 100 / (4 * 0.1 + 0.25))
    assert hotpath.on_off(on, off) == f"0.95x median of 5 paired rounds [0.92-2.33; pooled {pooled:.2f}x]"
    assert hotpath.on_off(_tally(950), _tally(1000)) == "0.95x (pooled)"
