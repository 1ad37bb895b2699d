"""The NATS client of the control plane and the daemon: the hottest subscriptions' messages go straight
to a plain function.

nats-py hands each message of a callback subscription to a task of the
subscription's own: a `Msg` object, a queue put, a wake-up of that task, a queue
get, then an awaited coroutine. That is 4-5 us per message, and every token of
every stream a gateway relays is one (a 64-token stream is 66 messages). A
subscription made with `subscribe` below is handed each plain message (no
headers) synchronously by the read loop as it parses it: in the order parsed,
which is the order the server delivered. A message with headers (the server's
no-responders status) takes nats-py's usual path to the same function, as does
every message when the connection is not a `DirectClient`.

The hook is nats-py's `_process_msg` (the parser's one call per message, the
same since nats-py 2.0); tests/test_nats_direct.py fails if that ever changes.

It also keeps `flush()` a barrier. nats-py 2.16 writes a flush's PING straight to
the socket, ahead of the commands still queued for its flusher task (a SUB or a
PUB just made), so `flush()` could return before the server had them: a
subscription "confirmed" that way missed 1-6% of first messages published from
another connection (measured here). Its PING now queues behind them.

And `publish_nowait` queues a message without a coroutine, so a callback can
publish: what is queued in one loop turn leaves in one socket write either way,
written at the turn's end by a callback rather than nats-py's flusher task
while the socket keeps up (the flusher's queue and task step were a fifth of
a daemon's Python work per token). (Writing a request's work message at once instead, ahead of the flusher, cost
the gateway 0.07-0.12 ms of CPU per request at c=16-64: a write per message
instead of one per loop turn, and the usage event in a write of its own.)

Its parser (`_Parser`) reads a `MSG` line with `find` and `split` rather than
nats-py's regular expression, and hands a direct subscription's message over
without a coroutine: a regular expression match, a coroutine and its frames per
message were about 5% of a gateway's instructions at concurrency 1, where every
token is a message. Anything else (other operations, headers, a line or
payload not all read yet, anything malformed) is left to nats-py's parser. Those
messages are taken from the connection reader's `feed_data` as they arrive,
when nothing is pending before them, without waking nats-py's read loop.

It lives in schemas/ because the daemon, which never imports services/, uses it too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from nats.aio.client import PING_PROTO, Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import MaxPayloadError
from nats.protocol.parser import AWAITING_CONTROL_LINE, MAX_CONTROL_LINE_SIZE, Parser

log = structlog.get_logger("nats")

# (subject, payload, headers): headers are None on the direct path. Must not block; should not raise.
OnMessage = Callable[[str, bytes, dict[str, str] | None], None]
# (subject, reply subject, payload, headers): a request, which its handler answers on the reply subject.
OnRequest = Callable[[str, str, bytes, dict[str, str] | None], None]


_MSG = b"MSG "
# The states in which `publish` sends at once: connected, or draining subscriptions only.
_PUBLISHING = frozenset({Client.CONNECTED, Client.DRAINING_SUBS})
_CRLF = b"\r\n"


def _plain_msg(data: bytes | bytearray, pos: int) -> tuple[int, bytes | bytearray, bytes | bytearray, int, int] | None:
    """The whole `MSG <subject> <sid> [reply-to] <#bytes>` at `pos` of `data`, line and payload both read:
    (sid, subject, reply-to, payload start, payload end). None for anything else (another operation, a
    message not all read yet, a line nats-py's MSG_RE would not take), which nats-py's parser handles."""
    if not data.startswith(_MSG, pos):
        return None
    end = data.find(_CRLF, pos + 4, pos + MAX_CONTROL_LINE_SIZE)
    if end < 0:
        return None
    # What nats-py's MSG_RE takes, split on whitespace.
    args = data[pos + 4 : end].split()
    reply: bytes | bytearray = b""
    if len(args) == 3:
        subject, sid, size = args
    elif len(args) == 4:
        subject, sid, reply, size = args
    else:
        return None
    if not (sid.isdigit() and size.isdigit()):
        return None
    start = end + 2
    stop = start + int(size)
    if len(data) < stop + 2:
        return None  # the payload is not all here
    return int(sid), subject, reply, start, stop


class _Parser(Parser):
    """nats-py's parser, with plain `MSG`s read without a regular expression (see above)."""

    nc: DirectClient
    # Inside `parse` (which may wait, in nats-py's part): `take` must not run then, or messages would pass
    # the ones being parsed.
    busy = False

    async def parse(self, data: bytes = b"") -> None:
        self.busy = True
        try:
            buf = self.buf
            buf.extend(data)
            nc = self.nc
            while buf and self.state == AWAITING_CONTROL_LINE:
                found = _plain_msg(buf, 0)
                if found is None:
                    break
                sid, subject, reply, start, stop = found
                payload = bytes(buf[start:stop])
                del buf[: stop + 2]
                if not nc.deliver(sid, subject, reply, payload):
                    await nc._process_msg(sid, bytes(subject), bytes(reply), payload, None)  # type: ignore[arg-type]
            if buf:
                await Parser.parse(self)
        finally:
            self.busy = False

    def idle(self) -> bool:
        """Nothing read waits to be parsed, and `parse` is not running."""
        return not self.buf and not self.busy and self.state == AWAITING_CONTROL_LINE

    def take(self, data: bytes) -> int:
        """Hand the direct subscriptions' whole plain messages at the start of `data` over now (the parser
        must be `idle`); how many bytes they took. It stops at the first anything else."""
        pos = 0
        deliver = self.nc.deliver
        try:
            while (found := _plain_msg(data, pos)) is not None:
                sid, subject, reply, start, stop = found
                if not deliver(sid, subject, reply, data[start:stop]):
                    break  # not a direct subscription's: nats-py's way, through the read loop
                pos = stop + 2
        except Exception:
            # Called from the connection's data_received: nothing may escape it (uvloop would close the
            # connection). The message at `pos` was not handed over; the read loop gets it from there.
            with contextlib.suppress(Exception):
                log.exception("nats_direct_read_failed")
        return pos


class DirectClient(Client):
    """nats-py's client, plus subscriptions whose plain messages skip the per-subscription task."""

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, OnMessage] = {}
        self._direct_requests: dict[int, OnRequest] = {}
        self._ps = _Parser(self)
        # This turn's write of what `publish_nowait` queued, once scheduled.
        self._writing: asyncio.Handle | None = None
        # How many commands `publish_nowait(..., ahead=True)` put at the front of the pending list `_ahead_of`
        # (nats-py's flusher and `_write_turn` start a new list: then none).
        self._ahead = 0
        self._ahead_of: list[bytes] | None = None
        # Called once before the next write of what `publish_nowait` queued (`before_write`).
        self._before_write: Callable[[], object] | None = None
        # Known from the first `publish_nowait` on (asyncio.get_running_loop() is a getpid() system call
        # on Python 3.11).
        self._writing_loop: asyncio.AbstractEventLoop | None = None

    async def _read_loop(self) -> None:
        # Run by nats-py for every connection (a reconnection makes a new reader).
        self._read_direct()
        await super()._read_loop()

    def _read_direct(self) -> None:
        """Let the connection's reader hand the direct subscriptions' messages over as its bytes arrive.

        nats-py's read loop is a task awaiting `StreamReader.read`: every read wakes it (a future, a task
        step through three coroutines, a copy of the buffer) before its parser runs. Where the parser is
        idle and nothing waits in the reader, the messages at the start of newly arrived bytes are handed
        over from the reader's `feed_data` itself; what is left (anything else, a message not all read
        yet) goes into the reader as before, and so to the read loop, in order.
        """
        reader = getattr(self._transport, "_io_reader", None)
        parser = self._ps
        if not isinstance(reader, asyncio.StreamReader) or not isinstance(parser, _Parser):
            return
        feed = reader.feed_data

        def feed_data(data: bytes) -> None:
            if not reader._buffer and parser.idle():  # type: ignore[attr-defined]
                taken = parser.take(data)
                if taken:
                    if taken == len(data):
                        return
                    data = data[taken:]
            feed(data)

        reader.feed_data = feed_data  # type: ignore[method-assign,assignment]

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        # Behind what is pending, in order: the PONG then means the server has everything sent before.
        if future is None:
            future = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        self._pending.append(PING_PROTO)
        self._pending_data_size += len(PING_PROTO)
        await self._flush_pending()

    def publish_nowait(self, subject: str, payload: bytes, reply: str = "", *, ahead: bool = False) -> bool:
        """`publish` without a coroutine: queued now, written with everything queued in the same loop turn
        at its end (`_write_turn`). False, with nothing queued, where `publish` might have to wait
        (disconnected, or the pending buffer full): then await `publish` instead.

        `ahead`: in front of what is queued and not written yet, behind what was queued `ahead` before it
        (in order among themselves). Nothing waits behind a PING that way but what waited already.

        For subjects this process builds itself (schemas/subjects.py): they are not validated again.
        """
        # `is_connected and not is_draining_pubs`, without its three properties (a publish per token).
        flush_queue = self._flush_queue
        if self._status not in _PUBLISHING or flush_queue is None:
            return False
        size = len(payload)
        if size > self._max_payload:
            raise MaxPayloadError
        # nats-py's pub_cmd, without its f-string's formatting of a str then its encoding.
        command = b"".join((b"PUB ", subject.encode(), b" ", reply.encode(), b" %d\r\n" % size, payload, b"\r\n"))
        pending = self._pending_data_size + len(command)
        if self._max_pending_size > 0 and pending > self._max_pending_size:
            return False
        stats = self.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += size
        queued = self._pending
        if ahead:
            if self._ahead_of is not queued:
                self._ahead_of, self._ahead = queued, 0
            queued.insert(self._ahead, command)
            self._ahead += 1
        else:
            queued.append(command)
        self._pending_data_size = pending
        if self._writing is None:
            loop = self._writing_loop
            if loop is None:
                loop = self._writing_loop = asyncio.get_running_loop()
            self._writing = loop.call_soon(self._write_turn)
        return True

    def before_write(self, hook: Callable[[], object]) -> None:
        """Call `hook` once, right before the next `_write_turn` writes (it may queue more, `ahead`): a loop
        turn's usage events go in front of what the turn queued before them, in the same write."""
        self._before_write = hook

    def write_now(self) -> None:
        """Write what is queued now, as the turn's end would (`_write_turn`), instead of a loop turn later."""
        if self._writing is not None:
            self._writing.cancel()
            self._writing = None
        if self._pending_data_size:
            self._write_turn()

    def _write_turn(self) -> None:
        """Write what this loop turn queued (and anything queued before it), in one call, at the turn's end.

        Straight to the socket's transport while its buffer is empty: nats-py's flusher is a task woken
        through an asyncio.Queue per turn (a daemon sends a turn per token). Where something already
        waits in that buffer (the server reads slowly), or the connection is not a plain or TLS stream,
        or not connected, the flusher takes it as before: it writes, then waits for the buffer to drain.
        """
        hook = self._before_write
        if hook is not None:
            # Before `_writing` is cleared: what the hook queues goes in this write, without scheduling another.
            self._before_write = None
            try:
                hook()
            except Exception:
                # What was queued is written all the same; the hook's owner learns of its own failure.
                log.exception("nats_direct_before_write_failed")
        self._writing = None
        if not self._pending_data_size:
            return  # the flusher wrote it meanwhile
        writer: asyncio.StreamWriter | None = getattr(self._transport, "_io_writer", None)
        if (
            self._status in _PUBLISHING
            and writer is not None
            and not writer.transport.is_closing()
            and not writer.transport.get_write_buffer_size()
        ):
            writer.writelines(self._pending)
            self._pending = []
            self._pending_data_size = 0
            return
        flush_queue = self._flush_queue
        if flush_queue is not None and flush_queue.empty():
            # What `_flush_pending` queues: the flusher resolves it once written.
            flush_queue.put_nowait(asyncio.get_running_loop().create_future())

    # nats-py types `headers` as bytes; its parser passes None for a message without any.
    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        if headers or not self.deliver(sid, subject, reply, data):
            await super()._process_msg(sid, subject, reply, data, headers)

    def deliver(self, sid: int, subject: bytes | bytearray, reply: bytes | bytearray, data: bytes) -> bool:
        """Hand a plain message to its direct subscription's function; False if it has none (then nats-py's
        `_process_msg` takes it)."""
        on_message = self._direct.get(sid)
        on_request = self._direct_requests.get(sid) if on_message is None else None
        if (on_message is None and on_request is None) or sid not in self._subs:
            return False
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        try:
            if on_message is not None:
                on_message(subject.decode(), data, None)
            elif on_request is not None:
                on_request(subject.decode(), reply.decode(), data, None)
        except Exception:
            # The read loop must go on: one bad message is that message's problem. Not even a failing log
            # write may escape: nats-py's parser would drop the rest of what it had read (the next tokens).
            with contextlib.suppress(Exception):
                log.exception("nats_message_handler_failed", subject=subject[:200].decode(errors="replace"))
        return True


async def connect(servers: str | list[str], **options: Any) -> Client:
    """`nats.connect`, with a `DirectClient`."""
    nc = DirectClient()
    await nc.connect(servers, **options)
    return nc


def publish_nowait(nc: Client, subject: str, payload: bytes, reply: str = "", *, ahead: bool = False) -> bool:
    """`DirectClient.publish_nowait` where `nc` is one; False otherwise (then await `publish`)."""
    return isinstance(nc, DirectClient) and nc.publish_nowait(subject, payload, reply, ahead=ahead)


def before_write(nc: Client, hook: Callable[[], object]) -> None:
    """`DirectClient.before_write` where `nc` is one (a plain client writes what it was given, in order)."""
    if isinstance(nc, DirectClient):
        nc.before_write(hook)


def write_now(nc: Client) -> None:
    """`DirectClient.write_now` where `nc` is one (nats-py's own flusher writes for any other)."""
    if isinstance(nc, DirectClient):
        nc.write_now()


async def subscribe(nc: Client, subject: str, on_message: OnMessage) -> Subscription:
    """Subscribe `on_message`: called from the read loop itself when `nc` is a `DirectClient`.

    Unsubscribing (or a closed connection) ends the deliveries, as for any subscription.
    """

    async def slow(msg: Msg) -> None:
        on_message(msg.subject, msg.data, msg.headers)

    sub = await nc.subscribe(subject, cb=slow)
    if isinstance(nc, DirectClient):
        nc._direct[sub._id] = on_message
    return sub


async def subscribe_requests(nc: Client, subject: str, on_request: OnRequest) -> Subscription:
    """`subscribe`, for requests: `on_request` is also handed each message's reply subject."""

    async def slow(msg: Msg) -> None:
        on_request(msg.subject, msg.reply, msg.data, msg.headers)

    sub = await nc.subscribe(subject, cb=slow)
    if isinstance(nc, DirectClient):
        nc._direct_requests[sub._id] = on_request
    return sub
