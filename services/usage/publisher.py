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
before the connection's flusher runs, so it also shares the socket write of
whatever else that turn published (a request's reservation goes out with the
request's work message).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
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


# How often events still waiting for their acknowledgement are checked against their deadline.
EXPIRY_TICK_S = 0.1

# One event to send: its encoding, and what its publisher awaits (the stream sequence).
_Item = tuple[bytes, "asyncio.Future[int]"]


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish (nats-py's own `js.publish` decodes it with json and a dataclass)."""

    stream: str = ""
    seq: int = 0
    error: dict[str, Any] | None = None


_PUBACK = msgspec.json.Decoder(_PubAck)


class Publisher:
    """Publishes usage events to the stream, a loop turn's events together, and awaits their PubAck.

    The acknowledgements come on one subscription of this replica's own inbox: nats-py's `js.publish`
    is a request (a new token, a future in a shared map, `asyncio.wait_for`, then `json.loads` and a
    dataclass per acknowledgement), which was a visible share of the gateway's CPU. Here a counter
    names the reply and msgspec reads the answer.
    """

    def __init__(self, nc: Nats, subject: str) -> None:
        self._nc = nc
        # This replica's usage subject: every event goes there.
        self._subject = subject
        self._inbox = nc.new_inbox()
        # Each message in flight: its reply subject → the futures of the events it holds.
        self._waiting: dict[str, list[asyncio.Future[int]]] = {}
        self._next = 0
        self._sub: Subscription | None = None
        self._starting = asyncio.Lock()
        # This turn's events not sent yet (encoded event, its future), if any.
        self._turn: list[_Item] = []
        # Events waiting for their acknowledgement: (deadline, future) per timeout, and the timer expiring
        # them while any wait (`expire_after`).
        self._deadlines: dict[float, collections.deque[tuple[float, asyncio.Future[int]]]] = {}
        self._ticking: asyncio.TimerHandle | None = None
        # What to call at once when an event's future is resolved here (`submit`'s `then`), by future.
        self._then: dict[asyncio.Future[int], Callable[[asyncio.Future[int]], None]] = {}
        # Sends waiting for what `publish_nowait` could not do (kept: the loop holds tasks weakly).
        self._background: set[asyncio.Future[None]] = set()
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
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def _on_ack(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        waiting = self._waiting.pop(subject, None)
        if waiting is None:
            return  # answered after every one of its events gave up
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
        for future in waiting:
            if future.done():
                continue  # its publish gave up (timed out or cancelled)
            if error is None:
                future.set_result(seq)
            else:
                future.set_exception(error)
            self._resolved(future)

    def _resolved(self, future: asyncio.Future[int]) -> None:
        then = self._then.pop(future, None) if self._then else None
        if then is not None:
            try:
                then(future)
            except Exception:
                # As the loop does with a done callback that raises: told, and nothing else stops.
                log.exception("usage_ack_callback_failed")

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, kept from the first call on."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    @property
    def pending(self) -> bool:
        """Events wait for the end of this loop turn."""
        return bool(self._turn)

    def submit(self, data: bytes, then: Callable[[asyncio.Future[int]], None] | None = None) -> asyncio.Future[int]:
        """Queue one encoded event for this loop turn's message. Its future gets the stream sequence of the
        message that holds it once JetStream acknowledged it, or the error nats-py's `js.publish` would raise.

        `then(future)` is called as soon as this publisher resolves the future, in the same call: not as a
        done callback, which the loop runs a turn later (an answer's end waits for its settlement's
        acknowledgement, and each such turn between the two was a wake-up of the loop per request).
        """
        loop = self.loop()
        future: asyncio.Future[int] = loop.create_future()
        if then is not None:
            self._then[future] = then
        self._turn.append((data, future))
        if len(self._turn) == 1:
            # The turn's first event: the ones the turn's other callbacks publish join it. Queued for the
            # connection's flusher before it runs, it also shares the socket write of what they published.
            loop.call_soon(self._end_turn)
        return future

    async def acknowledged(self, future: asyncio.Future[int], timeout_s: float) -> int:
        """Wait for a submitted event's acknowledgement (raises TimeoutError after `timeout_s`)."""
        self.expire_after(future, timeout_s)
        try:
            return await future
        finally:
            if future.cancelled():
                self._forget_answered()

    def expire_after(self, future: asyncio.Future[int], timeout_s: float) -> None:
        """Fail a submitted event's future with TimeoutError if it is not acknowledged within `timeout_s`
        (up to EXPIRY_TICK_S later).

        One timer ticks while events wait, instead of a timer per event (two per request, each a libuv
        timer made and cancelled under uvloop), and `asyncio.timeout` before that (a task lookup and a
        context manager per event).
        """
        loop = future.get_loop()
        # Deadlines in the order submitted: per timeout, so each queue's are in order too.
        queue = self._deadlines.get(timeout_s)
        if queue is None:
            queue = self._deadlines[timeout_s] = collections.deque()
        queue.append((loop.time() + timeout_s, future))
        if self._ticking is None:
            self._ticking = loop.call_later(EXPIRY_TICK_S, self._tick)

    def _tick(self) -> None:
        loop = self.loop()
        now = loop.time()
        expired = False
        for queue in list(self._deadlines.values()):  # a `then` may wait for another timeout
            while queue and (queue[0][1].done() or queue[0][0] <= now):
                _, future = queue.popleft()
                if not future.done():
                    future.set_exception(TimeoutError())
                    self._resolved(future)
                    expired = True
        if expired:
            self._forget_answered()
        waiting = any(self._deadlines.values())
        self._ticking = loop.call_later(EXPIRY_TICK_S, self._tick) if waiting else None

    def _forget_answered(self) -> None:
        """Forget the messages none of whose events still waits (an event gave up: rare, so a scan)."""
        for reply, futures in list(self._waiting.items()):
            if all(f.done() for f in futures):
                del self._waiting[reply]
        for future in [f for f in self._then if f.done()]:
            self._resolved(future)  # cancelled by whoever awaited it: told all the same

    def _end_turn(self) -> None:
        turn, self._turn = self._turn, []
        for group in _groups(turn):
            self._next += 1
            reply = subjects.usage_ack(self._inbox, self._next)
            futures = [f for _, f in group]
            self._waiting[reply] = futures
            payload = group[0][0] if len(group) == 1 else b"[" + b",".join(d for d, _ in group) + b"]"
            try:
                # No headers: no Nats-Msg-Id for JetStream to drop a retried event by (the writer drops it,
                # see ledger.apply), so the server keeps no table of ids and the consumer parses no headers.
                sent = self._sub is not None and nats_direct.publish_nowait(self._nc, self._subject, payload, reply)
            except Exception as exc:
                self._failed(reply, futures, exc)
                continue
            if sent:
                self.messages += 1
                self.events += len(group)
                continue
            # Not subscribed to the answers yet, disconnected or the buffer full: nats-py's own way.
            task = asyncio.ensure_future(self._send(payload, reply, futures))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send(self, payload: bytes, reply: str, futures: list[asyncio.Future[int]]) -> None:
        try:
            if self._sub is None:
                await self.start()
            await self._nc.publish(self._subject, payload, reply=reply)
        except Exception as exc:
            self._failed(reply, futures, exc)
            return
        self.messages += 1
        self.events += len(futures)

    def _failed(self, reply: str, futures: list[asyncio.Future[int]], exc: Exception) -> None:
        self._waiting.pop(reply, None)
        for future in futures:
            if not future.done():
                future.set_exception(exc)
                self._resolved(future)


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
