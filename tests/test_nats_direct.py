"""The NATS client of the control plane and the daemon (schemas/nats_direct.py) on a real nats-server.

The gateway relays every token through a direct subscription, so these pin
what it relies on: plain messages reach the function from the read loop itself,
in order; a message with headers (the server's no-responders status) still
arrives, with its headers; a handler that raises does not stop the connection;
nothing arrives after unsubscribing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol.command import pub_cmd
from nats.protocol.parser import Parser

from infra.nats import NatsServer
from schemas import nats_direct


@pytest.fixture
async def clients(bare_nats: NatsServer) -> AsyncIterator[tuple[Client, Client]]:
    direct = await nats_direct.connect(bare_nats.url)
    plain = await nats.connect(bare_nats.url)
    yield direct, plain
    await direct.close()
    await plain.close()


class Got:
    """What a subscription's function was handed: (subject, payload, headers, from the read loop)."""

    def __init__(self, *, failing: bytes | None = None) -> None:
        self.items: list[tuple[str, bytes, dict[str, str] | None, bool]] = []
        self.sub: Subscription | None = None
        self._failing = failing
        self._more = asyncio.Event()

    def __call__(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        if data == self._failing:
            raise RuntimeError("a bad message")
        # Not the subscription's own task: the read loop called us as it parsed the message.
        from_read_loop = self.sub is not None and asyncio.current_task() is not self.sub._wait_for_msgs_task
        self.items.append((subject, data, headers, from_read_loop))
        self._more.set()

    @property
    def payloads(self) -> list[bytes]:
        return [data for _, data, _, _ in self.items]

    async def until(self, n: int) -> None:
        async with asyncio.timeout(5):
            while len(self.items) < n:
                self._more.clear()
                await self._more.wait()


async def _subscribed(nc: Client, subject: str, got: Got) -> Got:
    got.sub = await nats_direct.subscribe(nc, subject, got)
    await nc.flush()
    return got


async def _send(nc: Client, subject: str, *payloads: bytes) -> None:
    for data in payloads:
        await nc.publish(subject, data)
    await nc.flush()


async def test_plain_messages_come_from_the_read_loop_in_order(clients: tuple[Client, Client]) -> None:
    direct, plain = clients
    got = await _subscribed(direct, "t.order.*", Got())
    for i in range(500):
        await plain.publish(f"t.order.{i % 7}", str(i).encode())
    await plain.flush()
    await got.until(500)
    assert [int(d) for d in got.payloads] == list(range(500))
    assert {s for s, _, _, _ in got.items} == {f"t.order.{i}" for i in range(7)}
    assert all(h is None and from_read_loop for _, _, h, from_read_loop in got.items)
    # What nats-py counts for the connection still adds up.
    assert direct.stats["in_msgs"] >= 500


async def test_a_message_with_headers_arrives_with_them(clients: tuple[Client, Client]) -> None:
    direct, plain = clients
    got = await _subscribed(direct, "t.hdr", Got())
    await plain.publish("t.hdr", b"a")
    await plain.publish("t.hdr", b"b", headers={"Status": "503"})
    await plain.flush()
    await got.until(2)
    assert got.items[0][:3] == ("t.hdr", b"a", None)
    (_, data, headers, _) = got.items[1]
    assert data == b"b"
    assert headers is not None
    assert headers["Status"] == "503"


async def test_no_responders_status_reaches_the_handler(clients: tuple[Client, Client]) -> None:
    """What the gateway sees when a provider vanished: the server's 503 on the reply subject."""
    direct, _ = clients
    inbox = direct.new_inbox()
    got = await _subscribed(direct, inbox, Got())
    # Nobody listens on the subject: the server answers the reply subject with a 503 status.
    await direct.publish("t.nobody.listens", b"x", reply=inbox, headers={"x": "1"})
    await direct.flush()
    await got.until(1)
    (subject, _, headers, _) = got.items[0]
    assert subject == inbox
    assert headers is not None
    assert headers.get("Status") == "503"


async def test_nothing_arrives_after_unsubscribing(clients: tuple[Client, Client]) -> None:
    direct, plain = clients
    got = await _subscribed(direct, "t.unsub", Got())
    await _send(plain, "t.unsub", b"1")
    await got.until(1)
    assert got.sub is not None
    await got.sub.unsubscribe()
    await direct.flush()
    await _send(plain, "t.unsub", b"2")
    await asyncio.sleep(0.1)
    assert got.payloads == [b"1"]


async def test_a_plain_client_takes_the_usual_path(clients: tuple[Client, Client]) -> None:
    _, plain = clients
    got = await _subscribed(plain, "t.plain", Got())
    await _send(plain, "t.plain", b"1")
    await got.until(1)
    (subject, data, _, from_read_loop) = got.items[0]
    assert (subject, data) == ("t.plain", b"1")
    assert not from_read_loop, "a plain nats-py client delivers through the subscription's task"


@pytest.mark.parametrize("log_fails", [False, True], ids=["logged", "log-write-fails"])
async def test_a_failing_handler_does_not_stop_the_connection(
    clients: tuple[Client, Client], monkeypatch: pytest.MonkeyPatch, log_fails: bool
) -> None:
    """The handler's error is logged once and the next message still arrives.

    `log-write-fails` was seen in CI: a log sink that failed (a closed stream) raised out of the error
    path into nats-py's parser, which then dropped the rest of what it had read: the next tokens of
    every stream. A log of our own either way: structlog unconfigured renders tracebacks with rich,
    which took seconds on a loaded CI machine (the test's timeout).
    """
    logged: list[tuple[str, dict[str, object]]] = []

    class Log:
        def exception(self, event: str, **kw: object) -> None:
            logged.append((event, kw))
            if log_fails:
                raise ValueError("write to closed file")

    monkeypatch.setattr(nats_direct, "log", Log())
    direct, plain = clients
    got = await _subscribed(direct, "t.fail", Got(failing=b"boom"))
    await _send(plain, "t.fail", b"1", b"boom", b"2")
    await got.until(2)
    assert got.payloads == [b"1", b"2"]
    assert direct.is_connected
    assert logged == [("nats_message_handler_failed", {"subject": "t.fail"})]


async def test_flush_is_a_barrier_for_what_was_sent_before_it(bare_nats: NatsServer) -> None:
    """A subscription confirmed by `flush()` gets the very next message another connection publishes.

    nats-py 2.16 writes flush's PING ahead of commands still queued for its flusher, so a SUB could
    reach the server after the PONG: 1-6% of these first messages were lost with a plain client.
    """
    direct = await nats_direct.connect(bare_nats.url)
    other = await nats.connect(bare_nats.url)
    try:
        for i in range(300):
            got = asyncio.Event()
            sub = await nats_direct.subscribe(direct, f"t.barrier.{i}", lambda *_, got=got: got.set())
            await direct.flush()
            await other.publish(f"t.barrier.{i}", b"x")
            await other.flush()
            try:
                await asyncio.wait_for(got.wait(), 0.5)
            except TimeoutError:
                pytest.fail(f"message {i} published after the subscription's flush never arrived")
            await sub.unsubscribe()
    finally:
        await other.close()
        await direct.close()


async def test_publish_nowait_keeps_order_with_publish_and_declines_what_it_cannot_queue(
    clients: tuple[Client, Client],
) -> None:
    direct, plain = clients
    got = await _subscribed(plain, "t.nowait", Got())
    sent = []
    for i in range(300):
        if i % 3:
            sent.append(nats_direct.publish_nowait(direct, "t.nowait", str(i).encode(), reply="t.r"))
        else:
            await direct.publish("t.nowait", str(i).encode())
    assert all(sent)
    await got.until(300)
    assert [int(d) for d in got.payloads] == list(range(300))
    assert direct.stats["out_msgs"] >= 300
    # A plain client has no such path; a closed one queues nothing.
    assert not nats_direct.publish_nowait(plain, "t.nowait", b"x")
    await direct.close()
    assert not nats_direct.publish_nowait(direct, "t.nowait", b"x")


async def test_a_request_subscription_gets_the_reply_subject_from_the_read_loop(
    clients: tuple[Client, Client],
) -> None:
    direct, plain = clients
    seen: list[tuple[str, str, bytes, dict[str, str] | None, bool]] = []
    done = asyncio.Event()
    sub: Subscription | None = None

    def on_request(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        from_read_loop = sub is not None and asyncio.current_task() is not sub._wait_for_msgs_task
        seen.append((subject, reply, data, headers, from_read_loop))
        if len(seen) == 2:
            done.set()

    sub = await nats_direct.subscribe_requests(direct, "t.work", on_request)
    await direct.flush()
    await plain.publish("t.work", b"plain", reply="t.reply.1")
    # With headers (a trace context): nats-py's usual path, the same function, the headers kept.
    await plain.publish("t.work", b"traced", reply="t.reply.2", headers={"traceparent": "00-x"})
    await plain.flush()
    async with asyncio.timeout(5):
        await done.wait()
    assert seen[0] == ("t.work", "t.reply.1", b"plain", None, True)
    subject, reply, data, headers, _ = seen[1]
    assert (subject, reply, data) == ("t.work", "t.reply.2", b"traced")
    assert headers is not None
    assert headers["traceparent"] == "00-x"


# ---- the parser: what nats-py's own parser makes of the same bytes, however they are split --------------


class _Recorder:
    """A client as a parser sees it: every message, whichever way it came, and every other operation."""

    def __init__(self, direct: set[int]) -> None:
        self.events: list[tuple[object, ...]] = []
        self._direct = direct

    def deliver(self, sid: int, subject: bytes | bytearray, reply: bytes | bytearray, data: bytes) -> bool:
        if sid not in self._direct:
            return False
        self.events.append(("msg", sid, bytes(subject), bytes(reply), data, None))
        return True

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self.events.append(("msg", sid, bytes(subject), bytes(reply), data, headers))

    async def _process_ping(self) -> None:
        self.events.append(("ping",))

    async def _process_pong(self) -> None:
        self.events.append(("pong",))

    async def _process_info(self, info: dict[str, object]) -> None:
        self.events.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.events.append(("err", err))


_OPS = st.sampled_from(
    [
        b"MSG a.b 1 5\r\nhello\r\n",
        b"MSG mp.v1.reply.p.g.r 2 3\r\n\x00\r\n\r\n",  # a payload holding CRLF
        b"MSG a.b 1 _INBOX.x.y 0\r\n\r\n",
        b"MSG a.b  7\tr  4\r\nabcd\r\n",  # odd spacing (a sid no subscription has)
        b"HMSG a.b 1 12 14\r\nNATS/1.0\r\n\r\nhi\r\n",
        b"HMSG a.b 2 r 16 16\r\nNATS/1.0 503\r\n\r\n\r\n",
        b"PING\r\n",
        b"PONG\r\n",
        b"+OK\r\n",
        b'INFO {"server_id":"x","max_payload":1048576}\r\n',
        b"-ERR 'Permissions Violation'\r\n",
    ]
)
_MALFORMED = st.sampled_from([b"MSG a.b x 5\r\nhello\r\n", b"MSG a.b 1 y\r\n", b"MSG a 1 2 3 4\r\n", b"NOPE\r\n"])


async def _parsed(kind: type[Parser], stream: bytes, cuts: list[int]) -> tuple[list[tuple[object, ...]], str]:
    recorder = _Recorder(direct={1, 2})
    parser = kind(recorder)
    error = ""
    at = 0
    try:
        for cut in [*sorted(cuts), len(stream)]:
            await parser.parse(stream[at:cut])
            at = cut
    except Exception as exc:
        error = type(exc).__name__
    return recorder.events, error


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(_OPS, min_size=1, max_size=12),
    bad=st.one_of(st.none(), _MALFORMED),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
async def test_the_parser_reads_what_nats_pys_reads_however_the_bytes_are_split(
    ops: list[bytes], bad: bytes | None, cuts: list[int]
) -> None:
    stream = b"".join(ops) + (bad or b"")
    cuts = [c for c in cuts if c <= len(stream)]
    ours = await _parsed(nats_direct._Parser, stream, cuts)
    assert ours == await _parsed(Parser, stream, cuts)
    if bad is None:
        assert ours[1] == ""
        assert len(ours[0]) == len([op for op in ops if op != b"+OK\r\n"])  # nats-py passes +OK by


@pytest.mark.unit
async def test_the_parser_hands_plain_messages_of_direct_subscriptions_over_without_a_coroutine() -> None:
    recorder = _Recorder(direct={1})
    calls: list[int] = []
    original = recorder._process_msg

    async def counted(*args: object) -> None:
        calls.append(1)
        await original(*args)  # type: ignore[arg-type]

    recorder._process_msg = counted  # type: ignore[method-assign,assignment]
    parser = nats_direct._Parser(recorder)
    await parser.parse(b"MSG a 1 2\r\nhi\r\nMSG a 1 r 2\r\nho\r\nMSG a 9 2\r\nhu\r\n")
    assert [e[2:5] for e in recorder.events] == [(b"a", b"", b"hi"), (b"a", b"r", b"ho"), (b"a", b"", b"hu")]
    assert calls == [1], "only the message of a sid without a direct subscription took nats-py's way"


@pytest.mark.unit
async def test_publish_nowait_queues_the_command_nats_pys_pub_cmd_makes() -> None:
    nc = _publishing_client()
    sent = [("a.b", "", b"hi"), ("mp.v1.work.p", "mp.v1.reply.p.g.r", b""), ("caf\u00e9", "r", b"\r\n\x00" * 9)]
    for subject, reply, payload in sent:
        assert nc.publish_nowait(subject, payload, reply)
    assert nc._pending == [pub_cmd(*args) for args in sent]
    assert nc._pending_data_size == sum(map(len, nc._pending))
    assert (nc.stats["out_msgs"], nc.stats["out_bytes"]) == (3, 2 + 0 + 27)
    nc._status = Client.DRAINING_PUBS
    assert not nc.publish_nowait("a", b"x")
    nc._status = Client.DRAINING_SUBS
    assert nc.publish_nowait("a", b"x")


def _publishing_client(writer: _Writer | None = None) -> nats_direct.DirectClient:
    """A client as connected for `publish_nowait`, writing to `writer` where one is given."""
    nc = nats_direct.DirectClient()
    nc._status = Client.CONNECTED
    nc._flush_queue = asyncio.Queue()
    nc._max_payload = 1024
    if writer is not None:
        nc._transport = type("Transport", (), {"_io_writer": writer})()
    return nc


class _Writer:
    """A connection's StreamWriter as `_write_turn` sees it: its writes, and what its buffer holds."""

    def __init__(self, buffered: int) -> None:
        self.writes: list[list[bytes]] = []
        self.transport = self
        self._buffered = buffered

    def writelines(self, data: list[bytes]) -> None:
        self.writes.append(list(data))

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def is_closing(self) -> bool:
        return False


@pytest.mark.unit
@pytest.mark.parametrize("buffered", [0, 1])
async def test_a_turns_publishes_are_one_write_at_its_end_or_the_flushers_when_the_socket_is_behind(
    buffered: int,
) -> None:
    writer = _Writer(buffered)
    nc = _publishing_client(writer)
    flush_queue = nc._flush_queue
    assert flush_queue is not None
    for i in range(3):
        assert nc.publish_nowait(f"s.{i}", b"x")
    assert writer.writes == [], "nothing written before the turn ends"
    await asyncio.sleep(0)
    expected = [pub_cmd(f"s.{i}", "", b"x") for i in range(3)]
    if buffered:
        # The socket is behind: nats-py's flusher writes it, then waits for the buffer to drain.
        assert (writer.writes, nc._pending, flush_queue.qsize()) == ([], expected, 1)
    else:
        assert (writer.writes, nc._pending, nc._pending_data_size) == ([expected], [], 0)
        assert flush_queue.empty()
    assert nc.publish_nowait("next", b"y")
    await asyncio.sleep(0)
    assert len(writer.writes) == (0 if buffered else 2), "the next turn writes again"


@pytest.mark.unit
async def test_bytes_arriving_at_an_idle_parser_hand_direct_messages_over_and_leave_the_rest_in_order() -> None:
    nc = nats_direct.DirectClient()
    got: list[tuple[str, bytes]] = []
    nc._direct[1] = lambda subject, data, headers: got.append((subject, data))
    nc._subs[1] = None  # type: ignore[assignment]
    reader = asyncio.StreamReader()
    nc._transport = type("Transport", (), {"_io_reader": reader})()
    nc._read_direct()
    parser = nc._ps
    assert isinstance(parser, nats_direct._Parser)

    # Idle: the direct messages go at once; a message of another subscription stops it, and it and
    # everything after it go to the reader, for the read loop.
    reader.feed_data(b"MSG a 1 2\r\nhi\r\nMSG b 1 2\r\nho\r\nMSG c 9 1\r\nx\r\nMSG d 1 1\r\ny\r\n")
    assert got == [("a", b"hi"), ("b", b"ho")]
    assert bytes(reader._buffer) == b"MSG c 9 1\r\nx\r\nMSG d 1 1\r\ny\r\n"  # type: ignore[attr-defined]

    # Something waits in the reader: nothing may pass it.
    reader.feed_data(b"MSG e 1 1\r\nz\r\n")
    assert got == [("a", b"hi"), ("b", b"ho")]
    reader._buffer.clear()  # type: ignore[attr-defined]

    # A message not all here yet goes to the reader whole; so does everything while the parser runs.
    reader.feed_data(b"MSG f 1 5\r\nab")
    assert bytes(reader._buffer) == b"MSG f 1 5\r\nab"  # type: ignore[attr-defined]
    reader._buffer.clear()  # type: ignore[attr-defined]
    parser.busy = True
    reader.feed_data(b"MSG g 1 1\r\nq\r\n")
    assert bytes(reader._buffer) == b"MSG g 1 1\r\nq\r\n"  # type: ignore[attr-defined]
    assert got == [("a", b"hi"), ("b", b"ho")]


async def test_a_real_connection_hands_direct_messages_over_as_they_arrive(clients: tuple[Client, Client]) -> None:
    """The fast path is in use on a real connection (no read-loop task around the handler), in order."""
    direct, plain = clients
    tasks: list[object] = []
    seen: list[bytes] = []

    def handler(subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        tasks.append(asyncio.current_task())
        seen.append(data)

    await nats_direct.subscribe(direct, "t.fast", handler)
    await direct.flush()
    for i in range(200):
        await plain.publish("t.fast", str(i).encode())
        if i % 20 == 0:
            await plain.flush()
            await asyncio.sleep(0.005)
    await plain.flush()
    async with asyncio.timeout(5):
        while len(seen) < 200:  # noqa: ASYNC110 - the handler is a plain function, called from the reader
            await asyncio.sleep(0.01)
    assert [int(d) for d in seen] == list(range(200))
    assert tasks.count(None) > 100, "most messages were handed over from the reader's feed_data"


def test_a_local_nats_server_runs_go_on_one_p(bare_nats: NatsServer) -> None:
    # infra/nats.py `server_env`: on a machine it shares with its clients, one P (no thread hand-offs
    # per message); an operator's own GOMAXPROCS wins.
    environ = Path(f"/proc/{bare_nats.proc.pid}/environ").read_bytes().split(b"\0")
    assert f"GOMAXPROCS={os.environ.get('GOMAXPROCS', '1')}".encode() in environ


@pytest.mark.unit
async def test_commands_queued_ahead_lead_the_turns_write_in_order_and_a_hook_queues_before_it() -> None:
    """A loop turn's usage events go in front of the work messages queued before them, in one write."""
    writer = _Writer(0)
    nc = _publishing_client(writer)

    def cmd(name: str) -> bytes:
        return pub_cmd(name, "", name.encode())

    assert nc.publish_nowait("work1", b"work1")
    assert nc.publish_nowait("usage1", b"usage1", ahead=True)
    assert nc.publish_nowait("work2", b"work2")
    assert nc.publish_nowait("usage2", b"usage2", ahead=True)
    assert nc._pending == [cmd("usage1"), cmd("usage2"), cmd("work1"), cmd("work2")]
    nc.write_now()
    expected = [cmd("usage1"), cmd("usage2"), cmd("work1"), cmd("work2")]
    assert writer.writes == [expected], "at once, not at the turn's end"
    await asyncio.sleep(0)
    assert len(writer.writes) == 1, "the turn's end finds nothing left"

    # A hook queues what it has right before the turn's write, ahead of the rest (and of nothing written).
    assert nc.publish_nowait("work3", b"work3")
    nc.before_write(lambda: nc.publish_nowait("usage3", b"usage3", ahead=True))
    assert nc._pending == [cmd("work3")]
    await asyncio.sleep(0)
    assert writer.writes[-1] == [cmd("usage3"), cmd("work3")]
    assert nc._writing is None, "what the hook queued went in that write: no other is scheduled"
    # Once: the next turn's write is only what it queued.
    assert nc.publish_nowait("work4", b"work4")
    await asyncio.sleep(0)
    assert writer.writes[-1] == [cmd("work4")]
    assert nc._pending_data_size == 0

    # A hook that fails keeps nothing from being written.
    def failing() -> None:
        raise RuntimeError("a hook that fails")

    nc.before_write(failing)
    assert nc.publish_nowait("work5", b"work5")
    await asyncio.sleep(0)
    assert writer.writes[-1] == [cmd("work5")]
