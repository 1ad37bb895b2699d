"""Receiving providers' reply frames: one wildcard subscription per gateway replica.

Frames go to the waiting request by id. The provider id in the subject must be
the one the request was sent to (NATS permissions pin who may publish under
that prefix), frames must arrive in sequence and be of bounded size, and one
provider's frames for one request are bounded in number and bytes by what the
request's max_tokens allows (services/gateway/vetting.py), so a flood can never
queue more than an honest answer would; anything else ends that provider's part
of the request, and the ones only a broken or hostile provider sends are
reported as violations.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client as Nats
from nats.aio.subscription import Subscription

from schemas import bus, nats_direct, subjects

# Far above any real frame (a delta is a few tokens); a bigger one is a broken or hostile provider.
MAX_FRAME_BYTES = 1 << 20
# The status message a NATS server sends to the reply subject of a message nobody subscribed to.
# Only the server sets headers on our reply subjects: providers publish plain frames, and a provider's
# own headers could at most fake its own loss (the same as going silent).
_STATUS = "Status"
_NO_RESPONDERS = "503"


class StreamBroken(Exception):
    """A provider's reply stream cannot be trusted any more.

    `recoverable`: the provider failed, not the request; another provider may continue it.
    `violation`: the kind of protocol violation, when the provider broke the protocol.
    """

    def __init__(self, code: str, message: str, *, recoverable: bool = False, violation: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.recoverable = recoverable
        self.violation = violation


@dataclass(frozen=True, slots=True)
class _ProviderLost:
    provider_id: str


@dataclass(frozen=True, slots=True)
class _Garbled:
    reason: str
    violation: str


_Item = bus.Frame | _ProviderLost | _Garbled


class ReplyStream:
    """The frames of one request from one provider, checked for order and bounded in number and bytes.

    Not an asyncio.Queue: a deque and the one waiter's future cost a fraction of a Queue's put and get
    (its unfinished-task count, its Event, its getters' deque), and every token passes here.
    """

    def __init__(
        self,
        request_id: str,
        provider_id: str,
        *,
        max_frames: int = 1 << 20,
        max_bytes: int = 1 << 30,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.request_id = request_id
        self.provider_id = provider_id
        # Where its frames come (set by `ReplyRouter.open`: the reply subject the work message names).
        self.subject = ""
        self._items: deque[_Item] = deque()
        # The reader waiting in `next` (a stream has one reader: its request's task).
        self._waiter: asyncio.Future[None] | None = None
        # The router's (or the running loop, once `next` waits).
        self._loop = loop
        self._expected = 0
        self.duplicates = 0
        self._frames_left = max_frames
        self._bytes_left = max_bytes
        # Set once the stream is broken by what arrived: later frames are dropped unread.
        self.dead = False
        # One timer per stream, not one per frame (`next`).
        self._timer: asyncio.TimerHandle | None = None
        # Called as the provider's final frame arrives (`ReplyRouter.on_final`).
        self.on_final: Callable[[], None] | None = None

    def push(self, item: _Item) -> None:
        self._items.append(item)
        self._wake()

    def ready(self) -> bool:
        """Something already arrived: `next` returns it without waiting."""
        return bool(self._items)

    def take_delta(self) -> bus.Delta | None:
        """The next frame, taken, if it arrived already, is next in sequence and a Delta. None for anything
        else: `next` deals with it. (`untake` puts one back: a frame its taker's checks refused.)"""
        items = self._items
        if items:
            item = items[0]
            if type(item) is bus.Delta and item.seq == self._expected:
                items.popleft()
                self._expected += 1
                return item
        return None

    def untake(self, frame: bus.Delta) -> None:
        """Put back the frame `take_delta` just returned: the next `next` returns it."""
        self._items.appendleft(frame)
        self._expected -= 1

    def receive(self, data: bytes | msgspec.Raw) -> None:
        """One frame as it came off the bus: bounded, counted against the budget, decoded and queued. One
        that breaks a bound or does not decode kills the stream (its reader meets a `_Garbled`).

        One method for what every frame of every stream goes through, not one call per step.
        """
        size = len(data)
        if size > MAX_FRAME_BYTES:
            self._garbled(f"oversized frame ({size} bytes) from {self.provider_id}", "oversized_frame")
            return
        self._frames_left -= 1
        self._bytes_left -= size
        if self._frames_left < 0 or self._bytes_left < 0:
            self._garbled(f"{self.provider_id} sent more frames than max_tokens allows", "frame_flood")
            return
        try:
            item = bus.decode_frame(data)
        except msgspec.DecodeError as exc:
            self._garbled(f"undecodable frame from {self.provider_id}: {str(exc)[:200]}", "undecodable_frame")
            return
        self._items.append(item)
        # `push`, inline: every frame of every stream comes here (the rest is what goes wrong).
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if type(item) is bus.Done and (on_final := self.on_final) is not None:
            on_final()  # after the reader's wake-up: what it schedules runs after the reader

    def _garbled(self, reason: str, violation: str) -> None:
        self.dead = True
        self.push(_Garbled(reason, violation))

    def lost(self, provider_id: str) -> None:
        self.push(_ProviderLost(provider_id))

    async def next(self, timeout: float) -> bus.Frame | None:  # noqa: ASYNC109 - per-frame deadline
        """The next frame in sequence, or None if none arrived within `timeout`.

        Not a timer per call (`asyncio.timeout` cost 3-4 us to arm and cancel, on nearly every frame of
        a stream the gateway keeps up with): the stream's one timer, armed for the earliest deadline
        waited for, wakes the waiter, which returns None only once its own deadline has passed. Frames
        a few ms apart share one timer per `timeout`. Not asyncio.wait_for either: on Python 3.11 it
        loses a cancellation that arrives just as a frame does (gh-86296), and a buyer's hang-up was
        lost that way now and then; a plain await of the waiter keeps it.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        items = self._items
        while True:
            if not items:
                if loop.time() >= deadline:
                    return None
                self._wake_by(loop, deadline)
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            item = items.popleft()
            if isinstance(item, _ProviderLost):
                raise StreamBroken(
                    "provider_lost", f"provider {self.provider_id} left the pool mid-request", recoverable=True
                )
            if isinstance(item, _Garbled):
                raise StreamBroken("provider_protocol_error", item.reason, recoverable=True, violation=item.violation)
            if item.seq < self._expected:
                self.duplicates += 1  # a redelivered frame: already handled, drop it
                continue
            if item.seq > self._expected:
                raise StreamBroken(
                    "provider_protocol_error",
                    f"frame gap from {self.provider_id}: got {item.seq}, want {self._expected}",
                    recoverable=True,
                )
            self._expected += 1
            return item

    def _wake_by(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self._timer is not None:
            if self._timer.when() <= deadline:
                return  # it fires first; the waiter then waits on if its own time is not up
            self._timer.cancel()
        self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def release(self) -> None:
        """Nobody reads this stream any more: its timer goes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def lost_notifier(stream: ReplyStream) -> Callable[[str], None]:
    return stream.lost


class ReplyRouter:
    """Hands each frame to its request's stream, and tells the providers of open streams that this gateway
    is still there: every `keepalive_ms` (0: never), a `bus.GatewayAlive` on each such provider's notices
    subject. A request sent through this router carries the same `keepalive_ms` (bus.InferenceRequest):
    a provider that hears nothing from the gateway for a few of them stops its requests (daemon/gateways.py).
    """

    def __init__(self, nc: Nats, gateway_id: str, *, keepalive_ms: int = 0) -> None:
        self._nc = nc
        self._gateway_id = gateway_id
        self.keepalive_ms = keepalive_ms
        self._keepalive: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Future[None]] = set()
        # Open streams by their reply subject (subjects.reply): a frame finds its stream with one dict
        # lookup, its subject unparsed. A provider can only publish under its own prefix (NATS
        # permissions), so the subject also names who sent it. Each stream is closed before its request
        # opens another (a failover, the next provider asked).
        self._streams: dict[str, ReplyStream] = {}
        self._subs: list[Subscription] = []
        self.stray_frames = 0
        # Called as a stream's final frame (bus.Done) arrives, after its reader was woken: the usage
        # publisher's `flush_soon`, so the settlement the reader makes leaves in the turn it is made.
        self.on_final: Callable[[], None] | None = None
        # Told (provider id, detail) of a bundle that does not decode: a protocol violation.
        self.on_garbled_bundle: Callable[[str, str], None] | None = None
        # Handed to each stream (asyncio.get_running_loop() is a getpid() system call on Python 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Straight from the read loop (schemas/nats_direct.py): every token of every stream comes this way.
        self._subs = [
            await nats_direct.subscribe(self._nc, subjects.replies_for_gateway(self._gateway_id), self._on_msg),
            await nats_direct.subscribe(self._nc, subjects.bundles_for_gateway(self._gateway_id), self._on_bundle),
        ]
        if self.keepalive_ms > 0:
            self._keepalive = asyncio.get_running_loop().call_later(self.keepalive_ms / 1000, self._keep_alive)

    def _keep_alive(self) -> None:
        """One `GatewayAlive` to each provider with an open stream here, naming those streams' requests (a timer:
        nothing to do while idle)."""
        open_requests: dict[str, list[str]] = {}
        for stream in self._streams.values():
            open_requests.setdefault(stream.provider_id, []).append(stream.request_id)
        for provider_id, request_ids in open_requests.items():
            listed = request_ids if len(request_ids) <= bus.MAX_SLOTS else None
            notice = bus.encode(
                bus.GatewayAlive(gateway_id=self._gateway_id, provider_id=provider_id, request_ids=listed)
            )
            subject = subjects.notices(provider_id)
            if not nats_direct.publish_nowait(self._nc, subject, notice):
                # Disconnected (the provider then hears nothing, as from a dead gateway: its frames are lost
                # meanwhile too), or not our own client: nats-py's publish, which may wait.
                sending = asyncio.ensure_future(self._publish(subject, notice))
                self._sending.add(sending)
                sending.add_done_callback(self._sending.discard)
        self._keepalive = asyncio.get_running_loop().call_later(self.keepalive_ms / 1000, self._keep_alive)

    async def _publish(self, subject: str, data: bytes) -> None:
        with contextlib.suppress(Exception):
            await self._nc.publish(subject, data)

    async def stop(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []

    def open(self, request_id: str, provider_id: str, *, max_frames: int, max_bytes: int) -> ReplyStream:
        stream = ReplyStream(request_id, provider_id, max_frames=max_frames, max_bytes=max_bytes, loop=self._loop)
        # Built (and its ids checked) once per leg: the work message names it, `close` forgets it.
        stream.subject = subjects.reply(provider_id, self._gateway_id, request_id)
        stream.on_final = self.on_final
        self._streams[stream.subject] = stream
        return stream

    def close(self, stream: ReplyStream) -> None:
        stream.release()
        if self._streams.get(stream.subject) is stream:
            del self._streams[stream.subject]

    def _on_msg(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        stream = self._streams.get(subject)
        if stream is None or stream.dead:
            # Late frames of a finished or failed-over request, a provider answering for another,
            # or the rest of a flood: dropped before any decoding.
            self.stray_frames += 1
            return
        if headers and headers.get(_STATUS) == _NO_RESPONDERS:
            # NATS itself says nobody listens on the provider's work subject (its daemon died or lost
            # its connection a moment ago): the provider is gone, it sent nothing, it broke no rule.
            stream.lost(stream.provider_id)
            return
        stream.receive(data)

    def _on_bundle(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Several requests' frames from one provider (schemas/bus.py `Bundle`): each is then handled
        exactly as if it had come alone on its request's reply subject."""
        try:
            frames = bus.decode_bundle(data)
        except msgspec.DecodeError as exc:
            # Whose requests it held is unknown: the provider is reported, its streams time out or go on.
            self.stray_frames += 1
            provider_id = subjects.parse_bundle(subject)
            if self.on_garbled_bundle is not None:
                self.on_garbled_bundle(provider_id, f"undecodable bundle from {provider_id}: {str(exc)[:200]}")
            return
        prefix = f"{subject}."
        streams = self._streams
        for request_id, frame in frames:
            stream = streams.get(prefix + request_id)
            if stream is None or stream.dead:
                self.stray_frames += 1
                continue
            stream.receive(frame)
