"""Usage events published in one loop turn share one message of the usage stream (services/usage/publisher.py).

Real nats-server (JetStream) and PostgreSQL: what is stored, what the ledger's consumer writes from it,
and the edges (a message's size limit, a refused event inside a shared message, a cancelled publisher).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from nats.aio.client import Client as Nats

from infra.nats import NatsServer
from schemas import nats_direct, subjects
from schemas.usage_events import Closed, Opened, Settlement, Whole, decode
from services.usage import ledger
from services.usage.ledger import UsageStream
from services.usage.publisher import MAX_GROUP_BYTES
from services.usage.pull import Pull
from tests.support.accounts import TestAccount, make_account_async
from tests.support.ledger import written_async
from tests.support.stack import Stack

MODEL = "synthetic-publisher-model"


@dataclass
class Bus:
    server: NatsServer
    nc: Nats
    db: asyncpg.Pool
    stream: UsageStream
    account: TestAccount
    day: dt.date

    def opened(self, rid: str, tokens: int = 9) -> Opened:
        a = self.account
        return Opened(rid, a.subject, a.account_id, a.key_id, None, MODEL, self.day, tokens)

    async def stored(self) -> list[bytes]:
        """The raw messages the stream holds now, in order."""
        js = self.nc.jetstream()
        state = (await js.stream_info(subjects.USAGE_STREAM)).state
        return [
            (await js.get_msg(subjects.USAGE_STREAM, seq)).data or b""
            for seq in range(state.first_seq, state.last_seq + 1)
        ]


@pytest.fixture
async def bus(stack: Stack, tmp_path: Path) -> AsyncIterator[Bus]:
    server = NatsServer.start(tmp_path / "nats")
    db = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=4)
    # As the gateway's: a connection publishing without a coroutine (nats_direct.publish_nowait).
    nc = await nats_direct.connect(server.url)
    stream = UsageStream(nc, db, f"gw-pub-{secrets.token_hex(3)}")
    account = await make_account_async(stack.database_url)
    day = dt.datetime.now(dt.UTC).date()
    await db.execute(
        "INSERT INTO quota_usage (subject, window_day) VALUES ($1, $2) ON CONFLICT DO NOTHING", account.subject, day
    )
    # The stream without its consumer, so what was stored can be read before it is written.
    await stream._ensure_stream()
    await stream.publisher.start()
    try:
        yield Bus(server, nc, db, stream, account, day)
    finally:
        await stream.stop()
        await stream.publisher.stop()
        await nc.close()
        await db.close()
        server.stop()


async def _one_held_then_one_late(bus: Bus) -> str:
    """A consumer lingering 5 s with one event in hand, and a later event published: the later one's id."""
    bus.stream._linger_s = 5.0
    await bus.stream.start()
    await bus.stream.publish(bus.opened(f"first{secrets.token_hex(5)}"))
    await asyncio.sleep(0.3)  # the consumer has it and lingers
    late = f"late{secrets.token_hex(5)}"
    await bus.stream.publish(bus.opened(late))
    return late


async def _published_then_caught_up_within(bus: Bus, rid: str, seconds: float) -> None:
    """`rid`'s reservation published, then a reader waiting for the ledger: it is written within `seconds`."""
    await bus.stream.publish(bus.opened(rid))
    started = time.monotonic()
    assert await bus.stream.caught_up(3.0)
    assert time.monotonic() - started < seconds
    assert await bus.db.fetchval("SELECT count(*) FROM reservations WHERE request_id = $1", rid) == 1


def _ok(rid: str) -> Closed:
    return Closed(rid, Settlement("p", 3, 4, 0, 5.0, 50.0, "ok"), keep_slot=False)


async def test_a_loop_turns_events_travel_as_one_message_and_reach_the_ledger(bus: Bus) -> None:
    rids = [f"turn{i}{secrets.token_hex(5)}" for i in range(20)]
    lone = f"lone{secrets.token_hex(5)}"
    seqs = await asyncio.gather(*(bus.stream.publish(bus.opened(rid)) for rid in rids))
    assert len(set(seqs)) == 1, "published in one turn: stored together"
    await bus.stream.publish(bus.opened(lone))
    await asyncio.gather(*(bus.stream.publish(_ok(rid)) for rid in [*rids, lone]))
    first, alone, closes = await bus.stored()
    assert first.startswith(b"[")
    assert [e.request_id for e in decode(first)] == rids
    # A lone event is a plain object, as every event was before: an older consumer still reads it.
    assert alone.startswith(b"{")
    assert decode(alone)[0].request_id == lone
    assert [e.request_id for e in decode(closes)] == [*rids, lone]
    assert (bus.stream.publisher.messages, bus.stream.publisher.events) == (3, 42)

    await bus.stream.start()
    await written_async(bus.server.url)
    rows = await bus.db.fetch(
        "SELECT request_id, completion_tokens, billed FROM usage_ledger WHERE subject = $1", bus.account.subject
    )
    assert sorted((r["request_id"], r["completion_tokens"], r["billed"]) for r in rows) == sorted(
        (rid, 4, True) for rid in [*rids, lone]
    )
    usage = await bus.db.fetchrow(
        "SELECT requests, tokens, inflight FROM quota_usage WHERE subject = $1", bus.account.subject
    )
    assert usage is not None
    assert (usage["requests"], usage["tokens"], usage["inflight"]) == (21, 21 * 7, 0)


async def test_a_batch_across_midnight_writes_both_days_reservations_and_settlements_once(bus: Bus) -> None:
    """Reservations of two UTC days in one batch (one call per day, in one transaction): each request is in
    the ledger once, only today's count against today, nothing is left in flight; written again, nothing
    changes."""
    a = bus.account
    late, early = f"yday{secrets.token_hex(5)}", f"today{secrets.token_hex(5)}"
    yesterday = bus.day - dt.timedelta(days=1)
    batch: list[Opened | Closed] = [
        Opened(late, a.subject, a.account_id, a.key_id, None, MODEL, yesterday, 9),
        bus.opened(early),
        _ok(late),
        _ok(early),
    ]
    for _ in range(2):
        await ledger.apply(bus.db, "gw-midnight", batch)
        rows = await bus.db.fetch("SELECT request_id, billed FROM usage_ledger WHERE subject = $1", a.subject)
        assert sorted((r["request_id"], r["billed"]) for r in rows) == sorted([(late, True), (early, True)])
        usage = await bus.db.fetchrow(
            "SELECT requests, tokens, inflight FROM quota_usage WHERE subject = $1", a.subject
        )
        assert usage is not None
        assert (usage["requests"], usage["tokens"], usage["inflight"]) == (1, 7, 0)
        assert await bus.db.fetchval("SELECT count(*) FROM reservations WHERE subject = $1", a.subject) == 0


async def test_a_turn_too_big_for_one_message_is_cut(bus: Bus) -> None:
    # Each event about 1.3 KB (a long model name): 150 of them are over 190 KB, past the stream's 64 KB limit.
    a = bus.account
    events = [
        Opened(f"big{i}{secrets.token_hex(5)}", a.subject, a.account_id, a.key_id, None, "m" * 1200, bus.day, 9)
        for i in range(150)
    ]
    seqs = await asyncio.gather(*(bus.stream.publish(e) for e in events))
    stored = await bus.stored()
    assert len(stored) == len(set(seqs)) >= 4
    assert all(len(m) <= MAX_GROUP_BYTES for m in stored)
    assert [e.request_id for m in stored for e in decode(m)] == [e.request_id for e in events]


async def test_a_refused_event_parks_its_message_and_the_others_in_it_are_written(bus: Bus) -> None:
    good = [f"good{i}{secrets.token_hex(5)}" for i in range(3)]
    poison = f"poison{secrets.token_hex(5)}"
    await asyncio.gather(*(bus.stream.publish(bus.opened(rid)) for rid in good))
    # 2^40 prompt tokens: beyond the ledger's integer columns, refused however often it is tried.
    bad = Closed(poison, Settlement("p", 1 << 40, 1, 0, None, None, "ok"), keep_slot=False)
    await asyncio.gather(bus.stream.publish(_ok(good[0])), bus.stream.publish(bad), bus.stream.publish(_ok(good[1])))
    await bus.stream.publish(_ok(good[2]))
    await bus.stream.start()
    await written_async(bus.server.url)
    rows = await bus.db.fetch("SELECT request_id FROM usage_ledger WHERE subject = $1", bus.account.subject)
    assert sorted(r["request_id"] for r in rows) == sorted(good)
    (parked,) = await bus.db.fetch("SELECT event, error FROM usage_dead_letters WHERE gateway_id = $1", bus.stream._gw)
    # The whole message, byte for byte, naming the event that was refused.
    assert [e.request_id for e in decode(parked["event"])] == [good[0], poison, good[1]]
    assert parked["error"].startswith(f"{poison}: ")


async def test_a_plain_nats_py_connection_publishes_a_turn_the_same_way(bus: Bus) -> None:
    """Without `publish_nowait` (a plain nats-py client, or a full pending buffer) each message is sent by
    nats-py's own coroutine: the same messages, the same answers."""
    nc = await nats.connect(bus.server.url)
    stream = UsageStream(nc, bus.db, f"gw-plain-{secrets.token_hex(3)}")
    try:
        rids = [f"plain{i}{secrets.token_hex(5)}" for i in range(5)]
        seqs = await asyncio.gather(*(stream.publish(bus.opened(rid)) for rid in rids))
        assert seqs == [1] * 5
        assert (stream.publisher.messages, stream.publisher.events) == (1, 5)
    finally:
        await stream.publisher.stop()
        await nc.close()


async def test_a_backlog_is_written_in_parts_in_order(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    # Parts of 3 events: requests' reservations and settlements fall in different transactions.
    monkeypatch.setattr(ledger, "APPLY_MAX", 3)
    rids = [f"part{i}{secrets.token_hex(5)}" for i in range(10)]
    await asyncio.gather(*(bus.stream.publish(bus.opened(rid)) for rid in rids))
    await asyncio.gather(*(bus.stream.publish(_ok(rid)) for rid in rids))
    await bus.stream.start()
    await written_async(bus.server.url)
    rows = await bus.db.fetch("SELECT request_id FROM usage_ledger WHERE subject = $1", bus.account.subject)
    assert sorted(r["request_id"] for r in rows) == sorted(rids)
    usage = await bus.db.fetchrow(
        "SELECT requests, tokens, inflight FROM quota_usage WHERE subject = $1", bus.account.subject
    )
    assert usage is not None
    assert (usage["requests"], usage["tokens"], usage["inflight"]) == (10, 70, 0)
    assert await bus.db.fetchval("SELECT count(*) FROM reservations WHERE request_id = ANY($1::text[])", rids) == 0


async def test_a_reader_waiting_for_the_ledger_cuts_the_consumers_linger_short(bus: Bus) -> None:
    # Batches 5 s apart while events keep coming: a reader (GET /v1/usage, a refusal being rechecked)
    # must not wait for that.
    late = await _one_held_then_one_late(bus)
    started = time.monotonic()
    assert await bus.stream.caught_up(3.0)
    assert time.monotonic() - started < 1.0
    assert await bus.db.fetchval("SELECT count(*) FROM reservations WHERE request_id = $1", late) == 1


async def test_a_reader_on_another_replica_hurries_this_replicas_consumer(bus: Bus) -> None:
    """A slot one replica gave back reaches a request on another only once written: the other replica's
    refusal recheck wakes this replica's lingering consumer over NATS."""
    late = await _one_held_then_one_late(bus)
    other_nc = await nats_direct.connect(bus.server.url)
    other = UsageStream(other_nc, bus.db, f"gw-other-{secrets.token_hex(3)}")
    try:
        await other.start()
        started = time.monotonic()
        assert await other.caught_up(3.0)
        assert time.monotonic() - started < 1.0
        assert await bus.db.fetchval("SELECT count(*) FROM reservations WHERE request_id = $1", late) == 1
    finally:
        await other.stop()
        await other_nc.close()


async def test_hurries_never_make_a_consumer_write_more_often_than_every_20_ms(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A buyer at their concurrency limit can have a refusal rechecked (a hurry) many times a second; each
    write costs Postgres about 0.4 ms, so a hurried consumer still writes at most every HURRIED_S."""
    writes: list[float] = []
    real_apply = ledger.apply

    async def counted(*args: object, **kwargs: object) -> None:
        writes.append(time.monotonic())
        await real_apply(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ledger, "apply", counted)
    bus.stream._linger_s = 5.0
    await bus.stream.start()
    stop = time.monotonic() + 0.6
    while time.monotonic() < stop:
        await bus.stream.publish(bus.opened(f"h{secrets.token_hex(6)}"))
        bus.stream._hurried()
        await asyncio.sleep(0.001)
    await bus.stream.caught_up(3.0)
    assert len(writes) >= 10, "hurried, it wrote well within its 5 s linger"
    # A write that took long lets the next batch follow it closely: the bound is on the rate.
    assert len(writes) - 1 <= (writes[-1] - writes[0]) / ledger.HURRIED_S + 1, writes


async def test_a_consumer_lingering_longer_than_a_quarter_second_is_waited_for_not_taken_for_gone(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While it lingers a consumer has no pull waiting; one that does not take hurries (a replica from
    before them, or the hurry lost: core NATS) must still be waited for, not taken for a gone replica."""
    monkeypatch.setattr(UsageStream, "_on_hurry", lambda self, *_: None)
    bus.stream._linger_s = 0.5
    await bus.stream.start()
    first = f"first{secrets.token_hex(5)}"
    await bus.stream.publish(bus.opened(first))
    # Written after its linger (the consumer was idle); from then on it lingers between batches.
    for _ in range(1000):
        if await bus.db.fetchval("SELECT count(*) FROM reservations WHERE request_id = $1", first):
            break
        await asyncio.sleep(0.005)
    else:
        pytest.fail("the first event was never written")
    late = f"late{secrets.token_hex(5)}"
    await bus.stream.publish(bus.opened(late))
    other_nc = await nats_direct.connect(bus.server.url)
    other = UsageStream(other_nc, bus.db, f"gw-other-{secrets.token_hex(3)}", linger_s=0.5)
    try:
        await other.start()
        assert await other.caught_up(3.0)
        assert await bus.db.fetchval("SELECT count(*) FROM reservations WHERE request_id = $1", late) == 1
    finally:
        await other.stop()
        await other_nc.close()


async def test_an_acknowledgement_that_never_comes_times_out_and_is_forgotten(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = bus.stream.publisher
    # JetStream's answers are lost on the way back (a stalled node, a cut connection): the publisher's
    # subscription to them drops every one.
    await publisher.stop()
    monkeypatch.setattr(publisher, "_on_ack", lambda *_: None)
    monkeypatch.setattr(publisher, "timeout_s", 0.3)
    await publisher.start()
    future = publisher.submit(msgspec.json.encode(bus.opened("r-never-acknowledged")))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await future
    assert 0.25 <= time.monotonic() - started < 2.0
    # Nothing is kept for an answer nobody waits for any more, and nothing ticks for it.
    assert publisher._waiting == {}
    assert not publisher._deadlines
    await asyncio.sleep(0.15)
    assert publisher._ticking is None
    # Answers come back again: the next event is acknowledged.
    await publisher.stop()
    monkeypatch.undo()
    await publisher.start()
    assert await asyncio.wait_for(publisher.submit(msgspec.json.encode(bus.opened("r-after-the-loss"))), 5.0) > 0


async def test_done_runs_in_the_acknowledgements_own_call_before_any_done_callback(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`send`'s `done` runs in the call that learns the event's outcome (no loop turn between JetStream's
    answer and what waits for it: an answer's end waits for its settlement so); one that raises stops
    neither the other events of its message nor the publisher; a timeout calls it too."""
    publisher = bus.stream.publisher
    seen: list[str] = []
    # Set while the publisher handles an acknowledgement (its subscription's callback, wrapped).
    handling: list[bool] = []
    on_ack = publisher._on_ack

    def wrapped(*args: Any) -> None:
        handling.append(True)
        try:
            on_ack(*args)
        finally:
            handling.pop()

    await publisher.stop()
    monkeypatch.setattr(publisher, "_on_ack", wrapped)
    await publisher.start()

    def noted(name: str) -> Any:
        def done(seq: int, error: BaseException | None) -> None:
            seen.append(f"{name}: {error or seq!r}{' (in the acknowledgement)' if handling else ''}")
            if name == "raises":
                raise RuntimeError("a continuation that fails")

        return done

    publisher.send(msgspec.json.encode(bus.opened("r-done-raises")), noted("raises"))
    publisher.send(msgspec.json.encode(bus.opened("r-done-plain")), noted("plain"))
    waited = publisher.submit(msgspec.json.encode(bus.opened("r-done-waited")))
    waited.add_done_callback(lambda _: seen.append("done callback"))
    bus.stream.send(
        bus.opened("r-done-stream"), lambda error: seen.append(f"stream: {error!r}{' (in it)' if handling else ''}")
    )
    seq = await waited
    await asyncio.sleep(0)
    assert seen[:3] == [
        f"raises: {seq} (in the acknowledgement)",
        f"plain: {seq} (in the acknowledgement)",
        "stream: None (in it)",
    ], "one message for the turn, told in order, in the acknowledgement's call"
    assert seen[3:] == ["done callback"]
    assert (await bus.stored())[-1].count(b"r-done-") == 4

    # Answers lost on the way back: the timeout tells the event, in its own call.
    await publisher.stop()
    monkeypatch.setattr(publisher, "_on_ack", lambda *_: None)
    monkeypatch.setattr(publisher, "timeout_s", 0.3)
    await publisher.start()
    seen.clear()
    publisher.send(msgspec.json.encode(bus.opened("r-done-lost")), noted("lost"))
    lost = publisher.submit(msgspec.json.encode(bus.opened("r-done-lost-too")))
    with pytest.raises(TimeoutError):
        await lost
    assert seen == ["lost: TimeoutError()"]
    assert publisher._waiting == {}


async def test_an_idle_consumer_writes_a_requests_first_events_a_linger_later_unless_hurried(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first events after a quiet spell are a request's reservation, published with its work: written
    at once, they took the gateway's loop while that request waited for its first token. They wait a
    linger, and go with what came meanwhile (the request's settlement), usually in one write."""
    writes: list[int] = []
    real_apply = ledger.apply

    async def counted(db: asyncpg.Pool, gateway_id: str, events: list[object]) -> None:
        writes.append(len(events))
        await real_apply(db, gateway_id, events)  # type: ignore[arg-type]

    monkeypatch.setattr(ledger, "apply", counted)
    bus.stream._linger_s = 0.5
    await bus.stream.start()
    rid = f"quiet{secrets.token_hex(5)}"
    await bus.stream.publish(bus.opened(rid))
    await asyncio.sleep(0.2)
    assert writes == [], "not written while the request starts"
    await bus.stream.publish(_ok(rid))
    await written_async(bus.server.url, 3.0)
    # Both in one write: the settlement was delivered while the reservation waited.
    assert writes == [2], writes
    assert await bus.db.fetchval("SELECT count(*) FROM usage_ledger WHERE request_id = $1", rid) == 1

    # After a quiet spell again, a reader waiting for the ledger does not wait for the linger.
    await asyncio.sleep(0.6)
    await _published_then_caught_up_within(bus, f"hurried{secrets.token_hex(5)}", 0.4)


async def test_a_reader_whose_hurry_outruns_its_event_by_far_is_not_left_waiting(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader's hurry is a wake-up over core NATS; the event it waits for comes through JetStream, and on a
    busy server long after it. A hurry that came to a consumer with nothing to write is spent; the reader
    asks again until the event is written, not the consumer's whole linger (5 s here) later."""
    real_on = Pull._on

    def slow_server(self: Pull, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        if headers:
            real_on(self, subject, reply, data, headers)
        else:  # each event delivered 0.3 s late: well after a reader's first hurry
            asyncio.get_running_loop().call_later(0.3, real_on, self, subject, reply, data, headers)

    monkeypatch.setattr(Pull, "_on", slow_server)
    # The hurry's echo over NATS (a second wake-up, arriving at a time of its own) is left out: one wake-up.
    monkeypatch.setattr(UsageStream, "_on_hurry", lambda self, *_: None)
    bus.stream._linger_s = 5.0
    await bus.stream.start()
    await _published_then_caught_up_within(bus, f"outrun{secrets.token_hex(5)}", 1.5)


async def test_a_stop_while_the_consumer_holds_a_requests_first_events_writes_them(bus: Bus) -> None:
    """The first events after a quiet spell wait a linger in the consumer's hands, out of the subscription's
    queue: a graceful stop then must still write them, not leave them to another replica's adoption."""
    bus.stream._linger_s = 5.0
    await bus.stream.start()
    rid = f"held{secrets.token_hex(5)}"
    await bus.stream.publish(bus.opened(rid))
    await asyncio.sleep(0.3)  # the consumer has it and lingers
    started = time.monotonic()
    await bus.stream.stop()
    assert time.monotonic() - started < 3.0
    assert await bus.db.fetchval("SELECT count(*) FROM reservations WHERE request_id = $1", rid) == 1
    info = await bus.nc.jetstream().stream_info(subjects.USAGE_STREAM)
    assert info.state.messages == 0, "nothing left in the stream for another replica to adopt"


async def test_a_streams_reservation_waits_one_batch_for_its_settlement_and_they_are_written_as_one(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches following each other hold back a stream's reservation whose settlement is not in the batch
    (unacknowledged) for the next: a stream that ended meanwhile is written as a whole answer, one ledger
    row and no reservations row in and out. A reservation is held once; one held at a stop is written."""
    calls: list[list[str]] = []
    real_apply = ledger.apply

    async def recorded(db: asyncpg.Pool, gateway_id: str, events: list[Any]) -> None:
        calls.append([f"{type(e).__name__}:{e.request_id}" for e in events])
        await real_apply(db, gateway_id, events)

    monkeypatch.setattr(ledger, "apply", recorded)
    stream, gw = bus.stream, bus.stream._gw
    await stream._add_consumer(gw)
    pull = Pull(bus.nc, subjects.USAGE_STREAM, subjects.usage_consumer(gw))
    await pull.start()
    short, long, whole = (f"{name}{secrets.token_hex(4)}" for name in ("short", "long", "whole"))

    async def reservations() -> set[str]:
        rows = await bus.db.fetch(
            "SELECT request_id FROM reservations WHERE request_id = ANY($1::text[])", [short, long, whole]
        )
        return {r["request_id"] for r in rows}

    try:
        await stream.publish(bus.opened(short))
        await stream.publish(bus.opened(long))
        done = _ok(whole)
        await stream.publish(Whole(bus.opened(whole), Closed(whole, done.settlement, keep_slot=False)))
        await stream._write(gw, await pull.drain(ledger.BATCH, 1.0), pull, hold=True)
        assert calls == [[f"Whole:{whole}"]], "the reservations wait; the rest is written"
        assert await reservations() == set()
        consumer = await bus.nc.jetstream().consumer_info(subjects.USAGE_STREAM, subjects.usage_consumer(gw))
        assert consumer.num_ack_pending == 2, "their messages wait for the batch that writes them"

        await stream.publish(_ok(short))
        await stream._write(gw, await pull.drain(ledger.BATCH, 1.0), pull, hold=True)
        # Held once: the long stream's reservation is written now, its settlement or not.
        assert sorted(calls[1]) == sorted([f"Opened:{short}", f"Opened:{long}", f"Closed:{short}"])
        assert await reservations() == {long}, "the short stream never had a reservations row"
        ledger_rows = await bus.db.fetch(
            "SELECT request_id, completion_tokens FROM usage_ledger WHERE request_id = ANY($1::text[])",
            [short, long, whole],
        )
        assert sorted((r["request_id"], r["completion_tokens"]) for r in ledger_rows) == sorted(
            [(short, 4), (whole, 4)]
        )
        await written_async(bus.server.url, 5.0)  # every message acknowledged

        # A reservation held when the replica stops gracefully is written, not left in the stream.
        last = f"last{secrets.token_hex(4)}"
        await stream.publish(bus.opened(last))
        await stream._write(gw, await pull.drain(ledger.BATCH, 1.0), pull, hold=True)
        assert await bus.db.fetchval("SELECT count(*) FROM reservations WHERE request_id = $1", last) == 0
        await stream._write(gw, [], pull)
        assert await bus.db.fetchval("SELECT count(*) FROM reservations WHERE request_id = $1", last) == 1
        await written_async(bus.server.url, 5.0)
    finally:
        await pull.close()


async def test_a_consumer_the_server_removed_is_made_again_and_writes_on(bus: Bus) -> None:
    """The server removes a consumer nobody pulled for its inactive threshold (a stalled loop, a long
    disconnection) or an operator deletes it: the replica makes it again and its events are still written."""
    await bus.stream.start()
    js = bus.nc.jetstream()
    await js.delete_consumer(subjects.USAGE_STREAM, subjects.usage_consumer(bus.stream._gw))
    rid = f"remade{secrets.token_hex(5)}"
    await bus.stream.publish(bus.opened(rid))
    await written_async(bus.server.url, 5.0)
    assert await bus.db.fetchval("SELECT count(*) FROM reservations WHERE request_id = $1", rid) == 1
    await js.consumer_info(subjects.USAGE_STREAM, subjects.usage_consumer(bus.stream._gw))


async def test_a_consumer_keeps_pulling_while_a_write_takes_long(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write can take seconds (Postgres restarting). Meanwhile the consumer must still pull: the server
    removes one nobody pulls, and other replicas take one with no pull waiting for gone."""
    real_apply = ledger.apply
    writing = asyncio.Event()

    async def slow_first(db: asyncpg.Pool, gateway_id: str, events: list[Any]) -> None:
        if not writing.is_set():
            writing.set()
            await asyncio.sleep(ledger.PULL_WAIT_S + 1.5)
        await real_apply(db, gateway_id, events)

    monkeypatch.setattr(ledger, "apply", slow_first)
    await bus.stream.start()
    first, second = f"slow{secrets.token_hex(5)}", f"during{secrets.token_hex(5)}"
    await bus.stream.publish(bus.opened(first))
    await asyncio.wait_for(writing.wait(), 5.0)
    await bus.stream.publish(bus.opened(second))
    await asyncio.sleep(ledger.PULL_WAIT_S + 0.5)
    info = await bus.nc.jetstream().consumer_info(subjects.USAGE_STREAM, subjects.usage_consumer(bus.stream._gw))
    assert info.num_waiting >= 1 or info.num_ack_pending == 2, info
    await written_async(bus.server.url, 5.0)
    for rid in (first, second):
        assert await bus.db.fetchval("SELECT count(*) FROM reservations WHERE request_id = $1", rid) == 1


async def test_a_backlog_of_more_messages_than_a_pull_takes_is_adopted_whole(bus: Bus) -> None:
    """A replica died with more unwritten messages than one pull request takes (ledger.BATCH): the peer
    that adopts its subject writes them all, in one go."""
    rids = [f"orphan{i}{secrets.token_hex(4)}" for i in range(ledger.BATCH + 88)]
    for rid in rids:  # one message each
        await bus.stream.publish(bus.opened(rid))
    other_nc = await nats_direct.connect(bus.server.url)
    other = UsageStream(other_nc, bus.db, f"gw-adopter-{secrets.token_hex(3)}")
    try:
        started = time.monotonic()
        assert await other.adopt_orphans() == len(rids)
        assert time.monotonic() - started < 10.0
        assert await bus.db.fetchval(
            "SELECT count(*) FROM reservations WHERE request_id = ANY($1::text[])", rids
        ) == len(rids)
        state = (await bus.nc.jetstream().stream_info(subjects.USAGE_STREAM)).state
        assert state.messages == 0
    finally:
        await other_nc.close()


async def test_flush_soon_sends_what_the_woken_requests_queue_in_their_turn_not_at_its_end(bus: Bus) -> None:
    """The reply router calls `flush_soon` as a provider's final frame wakes its request: the settlements the
    requests woken so far make leave right after them, one message for them all, before the loop turn's other
    callbacks (an answer's end waits for its settlement's acknowledgement). What comes later in the turn waits
    for the turn's end, as before."""
    publisher = bus.stream.publisher
    loop = asyncio.get_running_loop()
    sent_before_late: list[int] = []

    def settles(rid: str) -> None:
        bus.stream.send(_ok(rid), lambda _: None)

    def late() -> None:
        sent_before_late.append(publisher.messages)
        settles("r-flush-late")

    # As the router's reads do: a request woken, the flush asked for, a second request woken and the flush
    # asked for again (it moves behind the second), then a callback of the turn's that settles one more.
    loop.call_soon(settles, "r-flush-first")
    publisher.flush_soon()
    loop.call_soon(settles, "r-flush-second")
    publisher.flush_soon()
    loop.call_soon(late)
    for _ in range(50):
        if publisher.messages == 2:
            break
        await asyncio.sleep(0.01)
    assert sent_before_late == [1], "the two woken requests' settlements were sent before the turn went on"
    early, later = (await bus.stored())[-2:]
    assert [e.request_id for e in decode(early)] == ["r-flush-first", "r-flush-second"]
    assert [e.request_id for e in decode(later)] == ["r-flush-late"]

    # With nothing queued it sends nothing.
    publisher.flush_soon()
    await asyncio.sleep(0.05)
    assert publisher.messages == 2
