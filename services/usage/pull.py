"""A JetStream pull consumer whose deliveries the read loop hands over as they come (the ledger's reader).

nats-py's `fetch` takes each message with `next_msg`: a uuid4, a task around `asyncio.wait_for`
(itself a task on Python 3.11) and a timer per message; its `ack` is a coroutine per message. That
cost 44 us of CPU per usage event on this box where this takes 11 us (a scratch benchmark, 20,000
events in batches of 15), and a gateway's consumer reads one to two events per request it serves.

Here a pull request is published without a coroutine and its deliveries are appended to `got` by the
read loop itself (schemas/nats_direct.py): a long poll (`poll`, asked again as each expires until it
has its messages) or what is there now (`drain`). Acknowledgements are queued without a coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import NamedTuple

from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from schemas import nats_direct, subjects

# What the server answers a pull request with, when not a message (JetStream's ADR-13).
_TIMEOUT = "408"  # the request expired
_CONFLICT = "409"  # the consumer was deleted, changed leader, or too many requests wait
_NO_RESPONDERS = "503"  # no consumer (or none with a leader yet) takes the request
_HEARTBEAT = "100"
_DELETED = "Consumer Deleted"
# A long poll that ends without a word (its request or its end lost to a reconnection) is replaced this
# long after it should have expired.
_GRACE_S = 1.0
# After the server said the consumer is not there (no responders), this long before asking again: a new
# consumer of a clustered stream answers so until its leader is elected.
_RETRY_S = 0.1


class Delivery(NamedTuple):
    """One message the consumer delivered: its payload and its acknowledgement subject."""

    data: bytes
    reply: str

    def stream_seq(self) -> int | None:
        """Its sequence in the stream (read from the acknowledgement subject), if that parses."""
        with contextlib.suppress(Exception):
            return Msg.Metadata._from_reply(self.reply).sequence.stream
        return None


class Pull:
    """Reads one durable pull consumer of `stream`: a long poll (`poll`), or what is there now (`drain`).
    `on_ready` is called from the read loop when `got` stops being empty or `lost` is set."""

    def __init__(self, nc: Nats, stream: str, durable: str, on_ready: Callable[[], None] | None = None) -> None:
        self._nc = nc
        self._next = subjects.js_pull_next(stream, durable)
        self._inbox = nc.new_inbox()
        self._on_ready = on_ready
        self._sub: Subscription | None = None
        # Delivered and not yet taken, in the order delivered.
        self.got: list[Delivery] = []
        # The server says there is no such consumer (deleted, or never elected a leader): make it again.
        self.lost = False
        self._polling = False
        # The number of this process's last request, and the long poll waiting at the server (if any): its
        # number and how many messages it may still deliver.
        self._n = 0
        self._poll_n = 0
        self._poll_left = 0
        self._poll_timer: asyncio.TimerHandle | None = None
        self._expires_s = 0.0
        # A drain's request: its number and the future its end resolves, and how many messages it may still
        # deliver (the server sends no word after a request's last message when it asked for no more).
        self._draining: tuple[int, asyncio.Future[None]] | None = None
        self._drain_left = 0

    async def start(self) -> None:
        self._sub = await nats_direct.subscribe_requests(self._nc, subjects.js_pull_replies(self._inbox), self._on)

    async def close(self) -> None:
        self.stop_polling()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def poll(self, batch: int, expires_s: float) -> None:
        """Keep a pull request waiting at the server until `batch` messages came: each request waits for
        `expires_s`, and the next follows at once (the server forgets a consumer nobody pulls for its
        inactive threshold, and a pull waiting is what tells other replicas this one is alive)."""
        self._polling, self._poll_left, self._expires_s, self.lost = True, batch, expires_s, False
        self._request_poll()

    @property
    def polling(self) -> bool:
        """A long poll is under way (asked, or to be asked again)."""
        return self._polling

    def stop_polling(self) -> None:
        self._polling = False
        self._poll_n = 0
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None

    def take(self) -> list[Delivery]:
        taken, self.got = self.got, []
        return taken

    async def drain(self, batch: int, wait_s: float) -> list[Delivery]:
        """What the consumer has for this reader now, up to `batch` (with what was delivered already): the
        server answers at once; `wait_s` bounds the wait for that answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            n = self._number()
            done = loop.create_future()
            self._draining, self._drain_left = (n, done), batch
            # Without `expires`, which would make the server ignore no_wait.
            self._send({"batch": batch, "no_wait": True}, n)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done, max(0.0, deadline - loop.time()))
            self._draining = None
            if not (self.lost and not self.got and loop.time() + _RETRY_S < deadline):
                return self.take()
            # Not there yet (a new consumer of a clustered stream elects its leader): ask again.
            await asyncio.sleep(_RETRY_S)
            self.lost = False

    def ack(self, deliveries: list[Delivery]) -> None:
        """Acknowledge them (queued for one socket write); a connection that cannot take them now drops
        them, and the server delivers those again after its ack_wait (writing an event twice changes nothing)."""
        for d in deliveries:
            if not nats_direct.publish_nowait(self._nc, d.reply, b""):
                task = asyncio.ensure_future(self._nc.publish(d.reply, b""))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # ---- the read loop's side ----------------------------------------------------------------

    def _number(self) -> int:
        self._n += 1
        return self._n

    def _request_poll(self) -> None:
        if self._poll_timer is not None:
            self._poll_timer.cancel()
        self._poll_n = self._number()
        self._send({"batch": self._poll_left, "expires": int(self._expires_s * 1e9)}, self._poll_n)
        self._poll_timer = asyncio.get_running_loop().call_later(self._expires_s + _GRACE_S, self._poll_ended)

    def _poll_ended(self, *, retry_after: float = 0.0) -> None:
        self._poll_n = 0
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None
        if not self._polling or self.lost:
            return
        if retry_after:
            self._poll_timer = asyncio.get_running_loop().call_later(retry_after, self._request_poll)
        else:
            self._request_poll()

    def _send(self, request: dict[str, object], n: int) -> None:
        payload = json.dumps(request).encode()
        reply = subjects.js_pull_reply(self._inbox, n)
        if not nats_direct.publish_nowait(self._nc, self._next, payload, reply):
            # Disconnected (nats-py buffers it until it reconnects) or its buffer full.
            task = asyncio.ensure_future(self._nc.publish(self._next, payload, reply=reply))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _on(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        status = headers.get(api.Header.STATUS.value) if headers else None
        if not status:
            # A message (its subject is the event's own: which request it answers is not said).
            self.got.append(Delivery(data, reply))
            # Counted against the request waiting (with a long poll and a drain both out, as when a stop
            # drains, a miscount only ends one early: the caller asks again).
            if self._poll_n:
                self._poll_left -= 1
                if self._poll_left <= 0:
                    # The server delivered all it was asked for, and says no more.
                    self._polling = False
                    self._poll_ended()
            elif self._draining is not None:
                self._drain_left -= 1
                if self._drain_left <= 0 and not self._draining[1].done():
                    self._draining[1].set_result(None)
            if len(self.got) == 1 and self._on_ready is not None:
                self._on_ready()
            return
        if status == _HEARTBEAT:
            return
        try:
            n = int(subject.rsplit(".", 1)[-1])
        except ValueError:
            return
        lost = status == _NO_RESPONDERS or (
            status == _CONFLICT and _DELETED in (headers or {}).get(api.Header.DESCRIPTION.value, "")
        )
        if self._draining is not None and n == self._draining[0]:
            self.lost = self.lost or lost
            if not self._draining[1].done():
                self._draining[1].set_result(None)
        elif n == self._poll_n:
            if lost:
                self.lost = True
                self.stop_polling()
                if self._on_ready is not None:
                    self._on_ready()
            else:
                # Expired (408), or a leader change or too many waiting (409): the next one at once; what
                # else it says, wait a moment (never a tight loop of requests).
                self._poll_ended(retry_after=0.0 if status == _TIMEOUT else _RETRY_S)
