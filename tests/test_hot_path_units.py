"""The hot path's pure parts: frame coalescing, group commit, lease sizes, the SSE response."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from daemon.engine.base import EngineError, Event, Finished, TextChunk
from daemon.frames import coalesced
from schemas import bus
from schemas.disconnect import unless_disconnected
from schemas.tasks import cancel_and_wait
from services.gateway import pipeline
from services.gateway.exchange import Exchange
from services.gateway.frames import joined, joins
from services.gateway.sse import EventStream, Last, ServerSend
from services.usage.batch import GroupCommit
from services.usage.leases import HORIZON_S, MAX_DOUBLED, Lease, wanted
from services.usage.quotas import Limits

# Pure: no server, no process, no network (`just test -m unit`).
pytestmark = pytest.mark.unit


def _chunk(text: str, token: int, *, reasoning: str = "", call: bool = False) -> TextChunk:
    calls = (bus.ToolCall(id=f"c{token}", name="f", arguments="{}"),) if call else ()
    return TextChunk(text, 1, token_ids=(token,), reasoning=reasoning, tool_calls=calls)


async def _all(events: AsyncIterator[Event]) -> list[Event]:
    return [e async for e in events]


async def test_chunks_ready_together_go_in_one_frame() -> None:
    async def engine() -> AsyncIterator[Event]:
        # A decode step's three tokens at once, then one more a step later.
        for i in range(3):
            yield _chunk(f"w{i} ", i)
        await asyncio.sleep(0.01)
        yield _chunk("last", 3)
        yield Finished("length", 5, 4)

    frames = await _all(coalesced(engine()))
    assert [type(f) for f in frames] == [TextChunk, TextChunk, Finished]
    first, second = frames[0], frames[1]
    assert isinstance(first, TextChunk)
    assert isinstance(second, TextChunk)
    assert (first.text, first.tokens, first.token_ids) == ("w0 w1 w2 ", 3, (0, 1, 2))
    assert (second.text, second.token_ids) == ("last", (3,))


async def test_a_ready_chunk_is_never_held_back() -> None:
    sent = asyncio.Event()

    async def engine() -> AsyncIterator[Event]:
        yield _chunk("first", 1)
        # The next token comes only once the first reached the bus: holding it back would hang.
        await sent.wait()
        yield Finished("stop", 1, 1)

    frames = coalesced(engine())
    async with asyncio.timeout(2):
        first = await anext(frames)
        sent.set()
        rest = [e async for e in frames]
    assert isinstance(first, TextChunk)
    assert first.text == "first"
    assert [type(e) for e in rest] == [Finished]


async def test_a_whole_answer_gathers_its_tokens_into_few_frames_and_ends_at_once() -> None:
    loop = asyncio.get_running_loop()

    ended_at = 0.0

    async def engine() -> AsyncIterator[Event]:
        nonlocal ended_at
        # 40 tokens, one every 5 ms (a model decoding alone): 200 ms of answer.
        for i in range(40):
            yield _chunk(f"t{i} ", i)
            await asyncio.sleep(0.005)
        ended_at = loop.time()
        yield Finished("length", 3, 40)

    frames = [(loop.time(), f) async for f in coalesced(engine(), gather_s=0.1)]
    chunks = [f for _, f in frames if isinstance(f, TextChunk)]
    # Every token, in order, in one frame per 100 ms (not 40 frames) ...
    assert "".join(c.text for c in chunks) == "".join(f"t{i} " for i in range(40))
    assert [i for c in chunks for i in c.token_ids] == list(range(40))
    assert 1 <= len(chunks) <= 5, len(chunks)
    # ... and the end is not held back for the rest of a gathering window.
    assert isinstance(frames[-1][1], Finished)
    assert frames[-1][0] - ended_at < 0.05


async def test_a_stream_still_sends_each_token_when_it_is_ready() -> None:
    async def engine() -> AsyncIterator[Event]:
        for i in range(5):
            yield _chunk(f"t{i}", i)
            await asyncio.sleep(0.01)
        yield Finished("length", 3, 5)

    frames = await _all(coalesced(engine()))
    assert len([f for f in frames if isinstance(f, TextChunk)]) == 5


async def test_merging_keeps_what_the_buyer_sees_in_order() -> None:
    async def engine() -> AsyncIterator[Event]:
        yield _chunk("", 1, reasoning="think ")
        yield _chunk("answer", 2)
        yield _chunk("", 3, reasoning="more")  # reasoning after text: a frame of its own
        yield _chunk("", 4, call=True)
        yield _chunk("after the call", 5)  # nothing joins a frame after its tool calls
        yield Finished("tool_calls", 1, 5)

    frames = [f for f in await _all(coalesced(engine())) if isinstance(f, TextChunk)]
    assert [(f.reasoning, f.text, len(f.tool_calls)) for f in frames] == [
        ("think ", "answer", 0),
        ("more", "", 1),
        ("", "after the call", 0),
    ]
    assert [i for f in frames for i in f.token_ids] == [1, 2, 3, 4, 5]


async def test_an_engine_error_reaches_the_sender_after_what_came_before() -> None:
    async def engine() -> AsyncIterator[Event]:
        yield _chunk("partial", 1)
        raise EngineError("worker_crashed", "gone", retryable=True)

    got: list[Event] = []

    async def send_all() -> None:
        async for event in coalesced(engine()):
            got.append(event)

    with pytest.raises(EngineError) as raised:
        await send_all()
    assert raised.value.code == "worker_crashed"
    assert [e.text for e in got if isinstance(e, TextChunk)] == ["partial"]


async def test_group_commit_batches_what_queues_during_a_statement() -> None:
    batches: list[list[int]] = []
    gate = asyncio.Event()

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        if len(batches) == 1:
            await gate.wait()
        return [i * 10 for i in items]

    commit: GroupCommit[int, int] = GroupCommit(flush)
    first = commit.submit(1)
    await asyncio.sleep(0)
    later = [commit.submit(i) for i in range(2, 7)]
    gate.set()
    assert await first == 10
    assert await asyncio.gather(*later) == [20, 30, 40, 50, 60]
    # One statement for the lone first item, one for everything that queued behind it.
    assert batches == [[1], [2, 3, 4, 5, 6]]


async def test_group_commit_failure_reaches_every_item_of_the_batch() -> None:
    async def flush(items: list[int]) -> list[int]:
        raise ConnectionError("postgres went away")

    commit: GroupCommit[int, int] = GroupCommit(flush)
    futures = [commit.submit(i) for i in range(3)]
    for future in futures:
        with pytest.raises(ConnectionError):
            await future
    await commit.drain()


async def test_group_commit_writes_a_refused_batch_again_item_by_item() -> None:
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        if -1 in items:
            raise ValueError("out of range")  # what asyncpg raises for an argument Postgres cannot hold
        return [i * 10 for i in items]

    commit: GroupCommit[int, int] = GroupCommit(flush, split_on=(ValueError,))
    futures = [commit.submit(i) for i in (1, -1, 2)]
    assert await futures[0] == 10
    with pytest.raises(ValueError, match="out of range"):
        await futures[1]
    assert await futures[2] == 20
    # One try for the batch, then each item alone: only the bad one fails.
    assert batches == [[1, -1, 2], [1], [-1], [2]]
    # A failure not in split_on (Postgres gone) still fails the batch in one try.
    batches.clear()

    async def down(items: list[int]) -> list[int]:
        batches.append(items)
        raise ConnectionError("postgres went away")

    commit = GroupCommit(down, split_on=(ValueError,))
    for future in [commit.submit(i) for i in range(3)]:
        with pytest.raises(ConnectionError):
            await future
    assert batches == [[0, 1, 2]]


def test_deltas_queued_together_join_in_order() -> None:
    def delta(seq: int, text: str = "", reasoning: str = "", call: bool = False) -> bus.Delta:
        calls = [bus.ToolCall(id=f"c{seq}", name="f", arguments="{}")] if call else []
        return bus.Delta(seq=seq, text=text, tokens=1, token_ids=[seq], reasoning=reasoning, tool_calls=calls)

    run = [delta(1, reasoning="hm "), delta(2, "a")]
    assert joins(run[:1], run[1])
    assert not joins(run, delta(3, reasoning="more"))  # reasoning after text renders out of order
    assert not joins([delta(4, call=True)], delta(5, "x"))  # nothing after tool calls
    whole = joined([*run, delta(3, "b")])
    assert (whole.seq, whole.reasoning, whole.text, whole.tokens, whole.token_ids) == (3, "hm ", "ab", 3, [1, 2, 3])
    # Logprobs and tool calls keep their order across the frames joined; a frame's other fields are summed.
    lp = [bus.TokenLogprob(token=t, logprob=-0.5) for t in ("x", "y", "z")]
    first = msgspec.structs.replace(delta(6, "x"), logprobs=lp[:1])
    second = msgspec.structs.replace(delta(7, "yz", call=True), logprobs=lp[1:], tokens=2, token_ids=[7, 8])
    whole = joined([first, second])
    assert (whole.seq, whole.text, whole.tokens, whole.token_ids, whole.logprobs) == (7, "xyz", 3, [6, 7, 8], lp)
    assert ([c.id for c in whole.tool_calls], whole.reasoning) == (["c7"], "")
    assert (first.token_ids, first.logprobs) == ([6], lp[:1]), "the frames joined are left as they were"


class _Client:
    """An ASGI server's side of one response: what was sent, and a hang-up the test can cause."""

    def __init__(self) -> None:
        self.sent: list[dict[str, object]] = []
        self.hang_up = asyncio.Event()

    async def receive(self) -> dict[str, object]:
        await self.hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, object]) -> None:
        self.sent.append(message)


async def test_an_event_stream_sends_its_chunks_then_ends() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: [DONE]\n\n"

    client = _Client()
    await EventStream(chunks(), {"x-request-id": "r1"})({"type": "http"}, client.receive, client.send)  # type: ignore[arg-type]
    start, *bodies = client.sent
    assert start["status"] == 200
    assert dict(start["headers"]) == {b"content-type": b"text/event-stream; charset=utf-8", b"x-request-id": b"r1"}  # type: ignore[call-overload]
    assert [(b["body"], b["more_body"]) for b in bodies] == [
        (b"data: 1\n\n", True),
        (b"data: [DONE]\n\n", True),
        (b"", False),
    ]


async def test_an_event_streams_last_chunk_leaves_with_its_end() -> None:
    """A `Last` chunk is sent as the response's end: one message (uvicorn makes it one write), no empty end after."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield Last(b"data: [DONE]\n\n")

    client = _Client()
    await EventStream(chunks(), {})({"type": "http"}, client.receive, client.send)  # type: ignore[arg-type]
    assert [(b["body"], b["more_body"]) for b in client.sent[1:]] == [
        (b"data: 1\n\n", True),
        (b"data: [DONE]\n\n", False),
    ]


class _Feed:
    """A provider's call whose frames the test hands over, and what `pipeline.stream` asks of it."""

    provider_id = "p"

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bus.Delta | bus.Done] = asyncio.Queue()
        self.finished = False

    def ready(self) -> bool:
        return not self.queue.empty()

    def take_run(self, run: list[bus.Delta]) -> bus.Delta | None:
        return None

    def frames(self) -> AsyncGenerator[bus.Delta | bus.Done, None]:
        async def frames() -> AsyncGenerator[bus.Delta | bus.Done, None]:
            while True:
                frame = await self.queue.get()
                if isinstance(frame, bus.Done):
                    self.finished = True
                yield frame

        return frames()

    async def close(self) -> None:
        pass


class _Text:
    """A surface's renderer: a chunk per Delta, two for the end."""

    async def render(self, events: AsyncIterator[Event]) -> AsyncGenerator[bytes, None]:
        async for event in events:
            if isinstance(event, bus.Delta):
                yield f"data: {event.text}\n\n".encode()
            else:
                yield b"data: end\n\n"
                yield b"data: [DONE]\n\n"

    def failed(self, code: str, message: str) -> list[bytes]:
        return [b"data: failed\n\n"]


class _Settling:
    """Metering whose settlement the test acknowledges."""

    def __init__(self) -> None:
        self.acknowledged = asyncio.get_running_loop().create_future()

    def settling(self, ticket: object, **_: object) -> asyncio.Future[None]:
        return self.acknowledged


async def _streaming(call: _Feed) -> tuple[_Client, _Settling, asyncio.Future[None]]:
    from types import SimpleNamespace

    from services.usage.metering import Ticket
    from services.usage.quotas import Holder

    ex = Exchange("r1", stream=True)
    ex.ticket = Ticket("r1", Holder("a1", 1, 1, None), "m", usage=None)
    metering = _Settling()
    started = SimpleNamespace(ex=ex, call=call, headers={})
    response = pipeline.stream(SimpleNamespace(metering=metering), started, _Text())  # type: ignore[arg-type]
    client = _Client()
    responding = asyncio.ensure_future(response({"type": "http"}, client.receive, client.send))  # type: ignore[arg-type]
    return client, metering, responding


def _bodies(client: _Client) -> list[tuple[object, object]]:
    return [(b["body"], b["more_body"]) for b in client.sent[1:]]


async def test_a_streams_last_chunks_wait_for_its_settlement_and_leave_with_its_end() -> None:
    """Written before the settlement's acknowledgement, the last chunks left in one write and the response's
    end alone a few ms later in another (a second system call, a second wake-up of the buyer's client): with
    metering on, a tenth of the gateway's requests/s at c=64. Now the end and the last chunks are one write."""
    call = _Feed()
    client, metering, responding = await _streaming(call)
    call.queue.put_nowait(bus.Delta(seq=1, text="a", tokens=1, token_ids=[1]))
    await asyncio.sleep(0.01)
    assert _bodies(client) == [(b"data: a\n\n", True)], "a token that is here leaves at once"
    call.queue.put_nowait(bus.Delta(seq=2, text="b", tokens=1, token_ids=[2]))
    call.queue.put_nowait(bus.Done(seq=3, finish_reason="length", prompt_tokens=3, completion_tokens=2))
    await asyncio.sleep(0.01)
    assert _bodies(client) == [(b"data: a\n\n", True)], "the end waits for the settlement"
    assert not responding.done()
    metering.acknowledged.set_result(None)
    await asyncio.wait_for(responding, 2)
    assert _bodies(client) == [
        (b"data: a\n\n", True),
        (b"data: b\n\ndata: end\n\ndata: [DONE]\n\n", False),
    ]


async def test_an_answer_that_came_whole_sends_its_first_token_before_its_settlement() -> None:
    """All of it came with the final frame (a one-token answer): holding it for the settlement would add the
    acknowledgement's round trip to its time to first token, so it leaves at once and the end follows."""
    call = _Feed()
    call.queue.put_nowait(bus.Delta(seq=1, text="a", tokens=1, token_ids=[1]))
    call.queue.put_nowait(bus.Done(seq=2, finish_reason="length", prompt_tokens=3, completion_tokens=1))
    client, metering, responding = await _streaming(call)
    await asyncio.sleep(0.01)
    assert _bodies(client) == [(b"data: a\n\ndata: end\n\ndata: [DONE]\n\n", True)]
    metering.acknowledged.set_result(None)
    await asyncio.wait_for(responding, 2)
    assert _bodies(client)[1:] == [(b"", False)]


async def test_a_hang_up_closes_the_event_streams_chunks_and_ends_quietly() -> None:
    """The buyer hanging up while the answer waits for its next token cancels the wait: the chunks'
    generator is closed (that is what cancels the provider and settles), and the response just ends."""
    closed = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            await asyncio.sleep(3600)  # a provider that never sends the next token
            yield b"data: 2\n\n"
        finally:
            closed.set()

    client = _Client()
    responding = asyncio.ensure_future(
        EventStream(chunks(), {})({"type": "http"}, client.receive, client.send)  # type: ignore[arg-type]
    )
    await asyncio.sleep(0.05)
    client.hang_up.set()
    await asyncio.wait_for(responding, 2)
    assert closed.is_set()
    assert not responding.cancelled()
    assert [m.get("body") for m in client.sent[1:]] == [b"data: 1\n\n"]


async def test_an_event_stream_cancelled_from_outside_stays_cancelled() -> None:
    """Only the buyer's hang-up is swallowed: a server shutting down cancels the response as before."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        await asyncio.sleep(3600)
        yield b"never"

    client = _Client()
    responding = asyncio.ensure_future(
        EventStream(chunks(), {})({"type": "http"}, client.receive, client.send)  # type: ignore[arg-type]
    )
    await asyncio.sleep(0.05)
    responding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await responding


def test_a_lease_used_up_soon_after_its_grant_asks_for_twice_as_much() -> None:
    """A burst on a quiet subject: the smoothed rate still says 0, so without this every grant would
    cover one request (a Postgres statement per request) until the next maintenance tick."""
    lease = Lease("a1", dt.date(2026, 1, 1), Limits(10**6, 10**9, 100))
    assert wanted(lease, 10) == (1, 10, 1), "never granted: what the request at hand needs"
    lease.granted_r, lease.granted_at = 8, time.monotonic()
    assert wanted(lease, 10)[:2] == (16, 160)
    lease.granted_r = 10**6
    assert wanted(lease, 10)[0] == MAX_DOUBLED
    lease.granted_r, lease.granted_at = 8, time.monotonic() - HORIZON_S - 1
    assert wanted(lease, 10)[0] == 1, "a lease that lasted its horizon: the rate decides"
    lease.rate = 50.0
    assert wanted(lease, 10)[0] == 50 * HORIZON_S


def test_a_lease_short_of_slots_alone_asks_for_no_more_requests() -> None:
    """Its requests are topped up to what its rate needs, not doubled: a lease whose slots ran out again and
    again (a load rising and falling) had doubled its requests at each grant, to hundreds of thousands."""
    lease = Lease("a1", dt.date(2026, 1, 1), Limits(10**6, 10**9, 100), requests=5000, tokens=10**6)
    lease.granted_r, lease.granted_at = 4096, time.monotonic()
    assert wanted(lease, 10)[:2] == (1, 10)
    lease.rate = 3000.0
    assert wanted(lease, 10)[0] == 3000 * HORIZON_S - 5000, "topped up to its rate over the horizon"
    lease.in_use, lease.peak = 2, 16
    assert wanted(lease, 10)[2] == 14, "slots back up to the most in use lately"
    fresh = Lease("a2", dt.date(2026, 1, 1), Limits(10**6, 10**9, 100), remembered=8)
    assert wanted(fresh, 10)[:2] == (8, 80), "a new lease asks for what the subject's last one served"


def _serve(lease: Lease, rises: int, top: int, tokens: int = 10) -> list[int]:
    """Requests rising to `top` at once on this replica and falling back to 1, `rises` times, leased from a
    subject with room; the grants each rise took."""
    grants = []
    for _ in range(rises):
        grants.append(0)
        for _ in range(top - lease.in_use):
            if not lease.covers(tokens):
                r, t, c = wanted(lease, tokens)
                lease.requests, lease.tokens, lease.slots = lease.requests + r, lease.tokens + t, lease.slots + c
                lease.granted_r, lease.granted_at = r, time.monotonic()
                grants[-1] += 1
            lease.requests, lease.tokens, lease.slots = lease.requests - 1, lease.tokens - tokens, lease.slots - 1
            lease.in_use += 1
            lease.peak = max(lease.peak, lease.in_use)
        while lease.in_use > 1:
            keep = lease.keeps_slot()
            lease.in_use -= 1
            lease.slots += keep
    return grants


def test_a_load_that_rises_and_falls_keeps_the_slots_its_peak_needs_where_the_subject_has_room() -> None:
    """A closed loop whose client is busy half the time: its requests here rise to 16 and fall to 1 again and
    again. With room to spare the lease keeps the slots its peak needed, and leases none for the rises after
    the first (they had taken a statement each, a dozen requests apart); near the limit they go back."""
    lease = Lease("a1", dt.date(2026, 1, 1), Limits(10**6, 10**9, 10**6), requests=10**5, tokens=10**7)
    lease.total_c = 20  # the subject's slots in use or leased, as of the last grant
    grants = _serve(lease, rises=20, top=16)
    assert grants[0] > 0, grants
    assert sum(grants[1:]) == 0, grants
    assert lease.slots + lease.in_use == 16, "what its peak needed, no more"
    assert lease.spare_slots() == 0, "a tick now keeps them"
    lease.peak = lease.in_use  # the tick after: the peak since then is what it needs now
    assert lease.spare_slots() == lease.slots - 2
    # Near its limit (8 slots free), a slot beyond the one spare goes back to the subject as its request ends.
    near = Lease("a2", dt.date(2026, 1, 1), Limits(10**6, 10**9, 40), slots=2, in_use=3, peak=16)
    near.total_c = 32
    assert not near.keeps_slot()
    assert near.spare_slots() == 0, "as many spare as are in use, as before"
    near.slots = 12
    assert near.spare_slots() == 12 - 3, "not what its peak needed"
    near.slots, near.total_c = 2, 20
    assert near.keeps_slot()


async def test_an_event_streams_chunks_go_to_the_servers_own_send_when_it_is_known() -> None:
    """Behind `ServerSend`, the start passes through the app's send hooks and the chunks skip them."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"

    server, app = _Client(), _Client()

    async def asgi_app(scope: dict[str, object], receive: object, send: object) -> None:
        await EventStream(chunks(), {})(scope, receive, app.send)  # type: ignore[arg-type]

    await ServerSend(asgi_app)({"type": "http"}, server.receive, server.send)  # type: ignore[arg-type]
    assert [m["type"] for m in app.sent] == ["http.response.start"]
    assert [m.get("body") for m in server.sent] == [b"data: 1\n\n", b""]


def _samples(registry: CollectorRegistry) -> list[str]:
    """A registry's exposition, less the _created series (a timestamp) prometheus_client adds to its own
    metrics: the rest of ours must match theirs line for line."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_the_per_token_histogram_exports_what_prometheus_client_would() -> None:
    """services/metrics/histogram.py against prometheus_client's own Histogram, same observations."""
    from prometheus_client import Histogram

    from services.metrics.histogram import LoopHistogram

    bounds = (0.005, 0.01, 0.5, 1.0, 2.5)
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = LoopHistogram("gaps_seconds", "Gaps.", "model", bounds, registry=ours_registry)
    theirs = Histogram("gaps_seconds", "Gaps.", ["model"], buckets=bounds, registry=theirs_registry)
    # On a bound, between bounds, above every bound, zero; two label values.
    for model, value in [("a", 0.005), ("a", 0.0051), ("a", 0.7), ("a", 9.0), ("a", 0.0), ("b", 1.0)]:
        ours.labels(model).observe(value)
        theirs.labels(model).observe(value)
    # A frame joined to the one before it (services/gateway/exchange.py `joined`): a gap of 0, no clock read.
    ours.labels("b").observe_zeros(1)
    theirs.labels("b").observe(0.0)

    assert _samples(ours_registry) == _samples(theirs_registry)
    assert 'gaps_seconds_bucket{le="0.005",model="a"} 2.0' in _samples(ours_registry)
    assert 'gaps_seconds_count{model="a"} 5.0' in _samples(ours_registry)
    assert 'gaps_seconds_bucket{le="0.005",model="b"} 1.0' in _samples(ours_registry)
    with pytest.raises(ValueError, match="positive"):
        LoopHistogram("bad_seconds", "Bad.", "model", (0.0, 1.0), registry=CollectorRegistry())


def test_the_unlabelled_loop_histogram_exports_what_prometheus_client_would() -> None:
    from prometheus_client import Histogram

    from services.metrics.histogram import LoopHistogram

    bounds = (0.001, 0.01, 1.0)
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = LoopHistogram("lag_seconds", "Lag.", None, bounds, registry=ours_registry).labels()
    theirs = Histogram("lag_seconds", "Lag.", buckets=bounds, registry=theirs_registry)
    for value in (0.0005, 0.01, 3.0):
        ours.observe(value)
        theirs.observe(value)

    assert _samples(ours_registry) == _samples(theirs_registry)
    assert 'lag_seconds_bucket{le="0.01"} 2.0' in _samples(ours_registry)
    with pytest.raises(ValueError, match="no label value"):
        LoopHistogram("lag2_seconds", "Lag.", None, bounds, registry=CollectorRegistry()).labels("m")


def test_the_per_request_counters_export_what_prometheus_client_would() -> None:
    """services/metrics/counter.py against prometheus_client's own Counter, same increments."""
    from prometheus_client import Counter

    from services.metrics.counter import LoopCounter

    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = LoopCounter("mp_requests", "Requests.", ["route", "status"], registry=ours_registry)
    theirs = Counter("mp_requests", "Requests.", ["route", "status"], registry=theirs_registry)
    for labels, amount in [(("/a", "200"), 1), (("/a", "200"), 1), (("/a", "500"), 1), (("/b", "200"), 64.0)]:
        ours.labels(*labels).inc(amount)
        theirs.labels(*labels).inc(amount)

    assert _samples(ours_registry) == _samples(theirs_registry)
    assert 'mp_requests_total{route="/a",status="200"} 2.0' in _samples(ours_registry)
    assert ours_registry.get_sample_value("mp_requests_total", {"route": "/b", "status": "200"}) == 64.0
    with pytest.raises(ValueError, match="only goes up"):
        ours.labels("/a", "200").inc(-1)
    with pytest.raises(ValueError, match="2 label values"):
        ours.labels("/a")


async def test_a_non_stream_answer_is_cancelled_by_a_hang_up_and_only_by_one_before_it_ends() -> None:
    loop = asyncio.get_running_loop()
    hang_up: asyncio.Future[None] = loop.create_future()
    receives = 0

    async def receive() -> dict[str, str]:
        nonlocal receives
        receives += 1
        await hang_up
        return {"type": "http.disconnect"}

    generating = asyncio.Event()
    stopped: list[str] = []

    async def work() -> str:
        generating.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped.append("cancelled")  # where the gateway tells the provider to stop
            raise
        return "answer"

    answering = asyncio.ensure_future(unless_disconnected(receive, work()))
    await generating.wait()
    hang_up.set_result(None)
    with pytest.raises(asyncio.CancelledError):
        await answering
    assert stopped == ["cancelled"]

    # An answer that ends first is returned; its watcher goes, and a hang-up after it changes nothing.
    later: asyncio.Future[None] = loop.create_future()

    async def receive_later() -> dict[str, str]:
        await later
        return {"type": "http.disconnect"}

    async def quick() -> str:
        return "answer"

    async def answer_then_linger() -> str:
        result = await unless_disconnected(receive_later, quick())
        later.set_result(None)
        await asyncio.sleep(0.01)  # the task goes on (writing the response): no stray cancel lands
        return result

    assert await answer_then_linger() == "answer"
    assert receives == 1


class _Answered:
    """A provider's call as `pipeline.events` reads it: two tokens, then the end."""

    provider_id = "p"

    def __init__(self) -> None:
        self.generator: AsyncGenerator[bus.Delta | bus.Done, None] | None = None

    def ready(self) -> bool:
        return False

    def take_run(self, run: list[bus.Delta]) -> bus.Delta | None:
        return None

    def frames(self) -> AsyncGenerator[bus.Delta | bus.Done, None]:
        async def frames() -> AsyncGenerator[bus.Delta | bus.Done, None]:
            yield bus.Delta(seq=1, text="a", tokens=1, token_ids=[1])
            yield bus.Delta(seq=2, text="b", tokens=1, token_ids=[2])
            yield bus.Done(seq=3, finish_reason="length", prompt_tokens=3, completion_tokens=2)

        self.generator = frames()
        return self.generator


async def test_an_answer_read_to_its_end_leaves_no_generator_for_the_loop_to_close() -> None:
    """A surface stops reading at the final event, leaving the generators suspended at their last `yield`.
    Left so, each was closed later by the loop's finalizer hook: a thread-safe wake-up (an eventfd write
    and read) and a task of its own, per request. Closed by the pipeline, the loop never sees them."""
    finalized: list[object] = []
    hooks = sys.get_asyncgen_hooks()
    sys.set_asyncgen_hooks(firstiter=hooks.firstiter, finalizer=finalized.append)
    try:
        call = _Answered()
        ex = Exchange("r1", stream=False)
        async with contextlib.aclosing(pipeline.events(call, ex)) as answered:  # type: ignore[arg-type]
            async for event in answered:
                if isinstance(event, bus.Finished):
                    break
        assert call.generator is not None
        assert call.generator.ag_frame is None, "the provider's frames were closed"  # type: ignore[attr-defined]
        del answered, call
        gc.collect()
    finally:
        sys.set_asyncgen_hooks(*hooks)
    assert finalized == []


async def test_cancel_and_wait_ends_a_task_that_lost_its_cancellation() -> None:
    """asyncio.wait_for on Python 3.11 can swallow a cancellation (gh-86296; nats-py's fetch and connect use
    it): the task runs on, and `task.cancel(); await task` never returned (a ledger that never stopped)."""
    lost = 0

    async def loses_one_cancellation() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost += 1  # as wait_for does when its inner future completed at the same moment

    task = asyncio.ensure_future(loses_one_cancellation())
    await asyncio.sleep(0.02)
    async with asyncio.timeout(5):
        await cancel_and_wait(task)
    assert task.cancelled()
    assert lost == 1


class _OneRun:
    """A provider's call whose every token arrived before the gateway took the first: one run."""

    provider_id = "p"

    def __init__(self, frames: list[bus.Delta]) -> None:
        self._ready = frames[1:]
        self._first = frames[0]
        self.finished = False

    def ready(self) -> bool:
        return bool(self._ready)

    def take_run(self, run: list[bus.Delta]) -> bus.Delta | None:
        while self._ready:
            run.append(self._ready.pop(0))
        return None

    def frames(self) -> AsyncGenerator[bus.Delta | bus.Done, None]:
        async def frames() -> AsyncGenerator[bus.Delta | bus.Done, None]:
            yield self._first
            yield bus.Done(seq=4, finish_reason="length", prompt_tokens=3, completion_tokens=4)

        return frames()


async def test_an_answer_that_came_in_one_run_is_timed_and_counted_as_if_frame_by_frame() -> None:
    """Frames joined to a run's first skip the clock (Exchange.joined_frames); the run's end still marks the last
    token's time, so an answer whose tokens all queued up at the gateway still has a decoding rate."""
    from services.metrics.registry import Metrics
    from services.usage.metering import Ticket
    from services.usage.quotas import Holder

    metrics = Metrics()
    ex = Exchange("r1", stream=True, metrics=metrics)
    ex.label("m", lambda model: True)
    ex.ticket = Ticket("r1", Holder("a1", 1, 1, None), "m", usage=None)
    call = _OneRun([bus.Delta(seq=i, text="x", tokens=1, token_ids=[i]) for i in range(4)])
    chunks = [e async for e in pipeline.events(call, ex)]  # type: ignore[arg-type]
    assert [type(c) for c in chunks] == [bus.Delta, bus.Done]
    assert chunks[0].token_ids == [0, 1, 2, 3]  # type: ignore[union-attr]
    assert (ex.frames, ex.ticket.completion_tokens) == (4, 4)
    ex._count(metrics)
    sample = metrics.registry.get_sample_value

    assert sample("mp_gateway_decode_tokens_per_second_count", {"model": "m"}) == 1
    # The three joined frames' gaps are 0 (first bucket); the first frame's is the time to first token's.
    assert sample("mp_gateway_inter_token_seconds_bucket", {"model": "m", "le": "0.005"}) == 3
    assert sample("mp_gateway_inter_token_seconds_count", {"model": "m"}) == 3
