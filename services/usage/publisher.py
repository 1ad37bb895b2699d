"""Publishing usage events: the events of one loop turn go to JetStream as one message.

A gateway publishes two events per streamed request (its reservation, its
settlement; one for a whole answer: usage_events.Whole) and each waits for
JetStream's acknowledgement. Published one by one, every event is a
PUB to write, a message for JetStream to store and replicate, a PubAck for the
gateway to parse and a delivery (and an ack) for the ledger's consumer: most of
what metering costs a busy replica. Events published in the same loop turn (the
requests whose answers ended together, say) travel as one JSON array instead,
stored, acknowledged and delivered once. Nothing waits for more events to come:
the first event of a turn leaves when that turn's other callbacks have run, so a
lone request's event leaves as soon as before, alone and in the old format
(a single object). It is queued without a coroutine (`nats_direct.publish_nowait`)
ahead of what the connection has not written yet, and written at once with it: a
request's reservation goes out in front of the request's work message, in one
write, so nats-server stores the event while the provider starts (not while the
provider's Accepted comes back through it), and a settlement's acknowledgement
is not a loop turn later for the write's own turn.

A turn's end is late for settlements under load: the loop reads every ready
socket before it runs the next turn's callbacks, and each answer's end waits for
its settlement's acknowledgement. So the reply router says when a provider's
final frame woke its request (`flush_soon`), and the events queued by the time
the requests woken by that read have run leave then, in the turn that settled
them; what is queued later waits for the turn's end as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import Callable
from typing import Any

import msgspec
import nats.js.errors
import structlog
from nats.aio.client import Client as Nats
from nats.aio.subscription import Subscription
from nats.js import api

from schemas import nats_direct, subjects

log = structlog.get_logger("usage")

_NO_RESPONDERS = "503"
# A message's events stay well under the stream's max_msg_size (64 KB), with room for the brackets.
MAX_GROUP_BYTES = 48 * 1024


# How often messages still waiting for their acknowledgement are checked against their deadline.
EXPIRY_TICK_S = 0.1
# How long a message waits for its acknowledgement before its events fail with TimeoutError.
ACK_TIMEOUT_S = 2.0

# What an event's sender is told, once: the stream sequence of the message that holds it (0 with an error),
# and the error nats-py's `js.publish` would have raised, or None.
Done = Callable[[int, BaseException | None], None]
# One event to send: its encoding, and whom to tell.
_Item = tuple[bytes, Done]


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish (nats-py's own `js.publish` decodes it with json and a dataclass)."""

    stream: str = ""
    seq: int = 0
    error: dict[str, Any] | None = None


_PUBACK = msgspec.json.Decoder(_PubAck)


def _resolve(future: asyncio.Future[int], seq: int, error: BaseException | None) -> None:
    if future.done():
        return  # its waiter gave up (cancelled)
    if error is None:
        future.set_result(seq)
    else:
        future.set_exception(error)


class Publisher:
    """Publishes usage events to the stream, a loop turn's events together, and tells each event's sender
    what JetStream answered.

    The acknowledgements come on one subscription of this replica's own inbox: nats-py's `js.publish`
    is a request (a new token, a future in a shared map, `asyncio.wait_for`, then `json.loads` and a
    dataclass per acknowledgement), which was a visible share of the gateway's CPU. Here a counter
    names the reply and msgspec reads the answer. An event is sent with a plain callback (`send`), told
    in the acknowledgement's own call: no future, no deadline of its own (its message has one), nothing
    scheduled per event. A future per event and the chain of callbacks resolving it were most of what
    publishing cost a request.
    """

    def __init__(self, nc: Nats, subject: str, timeout_s: float = ACK_TIMEOUT_S) -> None:
        self._nc = nc
        # This replica's usage subject: every event goes there.
        self._subject = subject
        self.timeout_s = timeout_s
        self._inbox = nc.new_inbox()
        # Each message in flight: its reply subject → whom to tell about the events it holds.
        self._waiting: dict[str, list[Done]] = {}
        self._next = 0
        self._sub: Subscription | None = None
        self._starting = asyncio.Lock()
        # This turn's events not sent yet, if any.
        self._turn: list[_Item] = []
        # Messages in flight by deadline (all have the same timeout, so in the order sent), and the timer
        # expiring them while any wait.
        self._deadlines: collections.deque[tuple[float, str]] = collections.deque()
        self._ticking: asyncio.TimerHandle | None = None
        # Sends waiting for what `publish_nowait` could not do (kept: the loop holds tasks weakly).
        self._background: set[asyncio.Future[None]] = set()
        # The early send `flush_soon` scheduled, if it has not run yet.
        self._flushing: asyncio.Handle | None = None
        # Known from the first event on (asyncio.get_running_loop() is a getpid() system call on Python 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None
        # How many messages and events went out (metrics, read at scrape time).
        self.messages = 0
        self.events = 0

    async def start(self) -> None:
        async with self._starting:
            if self._sub is None:
                self._sub = await nats_direct.subscribe(self._nc, subjects.usage_acks(self._inbox), self._on_ack)

    async def stop(self) -> None:
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def _on_ack(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        waiting = self._waiting.pop(subject, None)
        if waiting is None:
            return  # answered after its deadline: its events were told TimeoutError
        error: BaseException | None = None
        seq = 0
        if headers and headers.get(api.Header.STATUS.value) == _NO_RESPONDERS:
            # No stream leader (or no stream) listens on the subject: an election, or not made yet.
            error = nats.js.errors.NoStreamResponseError()
        else:
            try:
                answer = _PUBACK.decode(data)
                if answer.error is not None:
                    nats.js.errors.APIError.from_error(answer.error)  # raises the error's own class
                if answer.stream != subjects.USAGE_STREAM:
                    raise nats.js.errors.APIError(
                        description=f"stored in {answer.stream!r}, not {subjects.USAGE_STREAM}"
                    )
                seq = answer.seq
            except Exception as exc:
                error = exc
        _tell(waiting, seq, error)

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, kept from the first call on."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def send(self, data: bytes, done: Done) -> None:
        """Queue one encoded event for this loop turn's message; `done(seq, error)` is called once, in the
        call that learns the outcome: JetStream's acknowledgement (the stream sequence of the message that
        holds the event), its error, a failed send, or TimeoutError after `timeout_s` without an answer
        (up to EXPIRY_TICK_S later). What `done` raises is logged; nothing else stops."""
        self._turn.append((data, done))
        if len(self._turn) == 1:
            # The turn's first event: the ones the turn's other callbacks publish join it. They go at the
            # turn's end, or as the connection writes what the turn queued before them if that comes first.
            self.loop().call_soon(self._end_turn)
            nats_direct.before_write(self._nc, self._publish_turn)

    def flush_soon(self) -> None:
        """Send the events queued by the time the callbacks scheduled so far have run, then.

        Called as a provider's final frame arrives (in the loop's reading of sockets): the request it
        woke settles when its task next runs, and this runs after it, in the same turn, instead of after
        the next turn's reads. Called again before that, it moves behind the tasks woken since.
        """
        flushing = self._flushing
        if flushing is not None:
            flushing.cancel()
        self._flushing = self.loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = None
        if self._turn:
            self._end_turn()

    def submit(self, data: bytes) -> asyncio.Future[int]:
        """`send`, told through a future: the stream sequence, or the error raised."""
        future: asyncio.Future[int] = self.loop().create_future()
        self.send(data, functools.partial(_resolve, future))
        return future

    def _tick(self) -> None:
        now = self.loop().time()
        deadlines, waiting = self._deadlines, self._waiting
        # Answered ones are dropped as they come to the front; acknowledgements come back in order.
        while deadlines and (deadlines[0][1] not in waiting or deadlines[0][0] <= now):
            _, reply = deadlines.popleft()
            told = waiting.pop(reply, None)
            if told is not None:
                _tell(told, 0, TimeoutError())
        self._ticking = self.loop().call_later(EXPIRY_TICK_S, self._tick) if deadlines else None

    def _end_turn(self) -> None:
        self._publish_turn()
        # Now, with what the connection has queued (the work messages of the requests these reservations are
        # for): each loop turn on the way to the acknowledgement is one more in every request's time.
        nats_direct.write_now(self._nc)

    def _publish_turn(self) -> None:
        """Queue the turn's events ahead of what the connection has not written yet, a message per group."""
        if not self._turn:
            return  # queued already, before the connection wrote
        turn, self._turn = self._turn, []
        deadline = self.loop().time() + self.timeout_s
        for group in _groups(turn):
            self._next += 1
            reply = subjects.usage_ack(self._inbox, self._next)
            told = [done for _, done in group]
            self._waiting[reply] = told
            self._deadlines.append((deadline, reply))
            payload = group[0][0] if len(group) == 1 else b"[" + b",".join(d for d, _ in group) + b"]"
            try:
                # No headers: no Nats-Msg-Id for JetStream to drop a retried event by (the writer drops it,
                # see ledger.apply), so the server keeps no table of ids and the consumer parses no headers.
                sent = self._sub is not None and nats_direct.publish_nowait(
                    self._nc, self._subject, payload, reply, ahead=True
                )
            except Exception as exc:
                self._failed(reply, exc)
                continue
            if sent:
                self.messages += 1
                self.events += len(group)
                continue
            # Not subscribed to the answers yet, disconnected or the buffer full: nats-py's own way.
            task = asyncio.ensure_future(self._send(payload, reply, len(group)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        if self._ticking is None and self._deadlines:
            self._ticking = self.loop().call_later(EXPIRY_TICK_S, self._tick)

    async def _send(self, payload: bytes, reply: str, events: int) -> None:
        try:
            if self._sub is None:
                await self.start()
            await self._nc.publish(self._subject, payload, reply=reply)
        except Exception as exc:
            self._failed(reply, exc)
            return
        self.messages += 1
        self.events += events

    def _failed(self, reply: str, exc: Exception) -> None:
        told = self._waiting.pop(reply, None)
        if told is not None:
            _tell(told, 0, exc)


def _tell(told: list[Done], seq: int, error: BaseException | None) -> None:
    for done in told:
        try:
            done(seq, error)
        except Exception:
            # As the loop does with a callback that raises: told, and nothing else stops.
            log.exception("usage_ack_callback_failed")


def _groups(turn: list[_Item]) -> list[list[_Item]]:
    """The turn's events in order, cut so that no message outgrows MAX_GROUP_BYTES."""
    groups: list[list[_Item]] = []
    size = MAX_GROUP_BYTES
    for item in turn:
        if size + len(item[0]) + 1 > MAX_GROUP_BYTES:
            groups.append([])
            size = 2  # the brackets
        groups[-1].append(item)
        size += len(item[0]) + 1
    return groups
