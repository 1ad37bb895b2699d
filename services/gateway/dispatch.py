"""Sending a request to a provider over NATS and reading its reply stream.

Each gateway replica has one wildcard subscription for all its replies
(`mp.v1.reply.*.<gateway>.*`) and hands frames to the waiting request by id.
The provider id in the subject must be the one we sent the request to, and
frames must arrive in sequence; anything else ends the stream with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
import structlog
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import bus, subjects
from services.errors import CoordinatorUnavailable, ProviderError, RequestTimeout
from services.gateway.pool import PoolView

log = structlog.get_logger("gateway.dispatch")


class StreamBroken(Exception):
    """The reply stream cannot be trusted any more (gap, lost provider, silence)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class _ProviderLost:
    provider_id: str


@dataclass(frozen=True, slots=True)
class _Garbled:
    reason: str


_Item = bus.Frame | _ProviderLost | _Garbled


class ReplyStream:
    """The frames of one request from one provider, checked for order."""

    def __init__(self, request_id: str, provider_id: str) -> None:
        self.request_id = request_id
        self.provider_id = provider_id
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._expected = 0
        self.duplicates = 0

    def push(self, item: _Item) -> None:
        self._queue.put_nowait(item)

    async def next(self, timeout: float) -> bus.Frame:  # noqa: ASYNC109 - per-frame deadline
        while True:
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                raise StreamBroken("provider_timeout", f"provider {self.provider_id} went silent") from None
            if isinstance(item, _ProviderLost):
                raise StreamBroken("provider_lost", f"provider {self.provider_id} left the pool mid-request")
            if isinstance(item, _Garbled):
                raise StreamBroken("provider_protocol_error", item.reason)
            if item.seq < self._expected:
                self.duplicates += 1  # a redelivered frame: already handled, drop it
                continue
            if item.seq > self._expected:
                raise StreamBroken(
                    "provider_protocol_error",
                    f"frame gap from {self.provider_id}: got {item.seq}, want {self._expected}",
                )
            self._expected += 1
            return item


def _lost_notifier(stream: ReplyStream) -> Callable[[str], None]:
    return lambda provider_id: stream.push(_ProviderLost(provider_id))


class ReplyRouter:
    def __init__(self, nc: Nats, gateway_id: str) -> None:
        self._nc = nc
        self._gateway_id = gateway_id
        self._streams: dict[str, ReplyStream] = {}
        self._sub: Subscription | None = None
        self.stray_frames = 0

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(subjects.replies_for_gateway(self._gateway_id), cb=self._on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def open(self, request_id: str, provider_id: str) -> ReplyStream:
        stream = ReplyStream(request_id, provider_id)
        self._streams[request_id] = stream
        return stream

    def close(self, stream: ReplyStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]

    async def _on_msg(self, msg: Msg) -> None:
        try:
            provider_id, _, request_id = subjects.parse_reply(msg.subject)
        except subjects.SubjectError:
            self.stray_frames += 1
            return
        stream = self._streams.get(request_id)
        if stream is None or stream.provider_id != provider_id:
            # Late frames of a finished or failed-over request, or a provider answering for another.
            self.stray_frames += 1
            return
        try:
            stream.push(bus.decode_frame(msg.data))
        except msgspec.DecodeError as exc:
            stream.push(_Garbled(f"undecodable frame from {provider_id}: {exc}"))


@dataclass
class Call:
    """A request a provider has accepted; iterate `frames()` for Delta and a final Done."""

    request_id: str
    provider_id: str
    accepted: bus.Accepted
    started: float
    _dispatcher: Dispatcher
    _stream: ReplyStream
    _watch: int
    _epoch: int
    finished: bool = False
    _closed: bool = False

    async def frames(self) -> AsyncIterator[bus.Delta | bus.Done]:
        idle = self._dispatcher.stream_idle_timeout_s
        deadline = self.started + self._dispatcher.request_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout("The request exceeded the gateway's time limit.")
            try:
                frame = await self._stream.next(min(idle, remaining))
            except StreamBroken:
                if time.monotonic() >= deadline:
                    raise RequestTimeout("The request exceeded the gateway's time limit.") from None
                raise
            if isinstance(frame, bus.Failed):
                self.finished = True
                raise StreamBroken(frame.code, frame.message)
            if isinstance(frame, bus.Accepted):
                raise StreamBroken("provider_protocol_error", "second accepted frame")
            if isinstance(frame, bus.Done):
                self.finished = True
            yield frame
            if self.finished:
                return

    async def close(self) -> None:
        """Release the request; if it did not finish, tell the provider to stop generating. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._dispatcher.release(self)
        if not self.finished:
            await self._dispatcher.cancel(self.provider_id, self.request_id)


class Dispatcher:
    def __init__(
        self,
        nc: Nats,
        pool: PoolView,
        router: ReplyRouter,
        gateway_id: str,
        *,
        accept_timeout_s: float,
        stream_idle_timeout_s: float,
        request_timeout_s: float,
        max_attempts: int = 3,
    ) -> None:
        self._nc = nc
        self._pool = pool
        self._router = router
        self._gateway_id = gateway_id
        self.accept_timeout_s = accept_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_attempts = max_attempts

    async def start(self, request: bus.InferenceRequest) -> Call:
        """Hand the request to the best provider that accepts it, or raise at once."""
        started = time.monotonic()
        candidates = self._pool.candidates(request.model)
        if not candidates:
            served = sorted(self._pool.models())
            hint = f" Models served now: {', '.join(served)}." if served else " No provider is connected."
            raise CoordinatorUnavailable(f"No provider can serve model {request.model!r} right now.{hint}")
        payload = bus.encode(request)
        last_error = ""
        for state in candidates[: self.max_attempts]:
            pid = state.provider_id
            stream = self._router.open(request.request_id, pid)
            watch = self._pool.watch(pid, _lost_notifier(stream))
            epoch = self._pool.note_sent(pid)
            await self._nc.publish(
                subjects.work(pid), payload, reply=subjects.reply(pid, self._gateway_id, request.request_id)
            )
            try:
                frame = await stream.next(self.accept_timeout_s)
            except StreamBroken as exc:
                frame = bus.Failed(seq=0, code=exc.code, message=exc.message, retryable=True)
            if isinstance(frame, bus.Accepted):
                return Call(request.request_id, pid, frame, started, self, stream, watch, epoch)
            self._router.close(stream)
            self._pool.unwatch(pid, watch)
            self._pool.note_finished(pid, epoch)
            if isinstance(frame, bus.Failed) and not frame.retryable:
                raise ProviderError(f"The provider refused the request: {frame.message}")
            # Nothing ran there; make sure a late acceptance is cancelled, then try the next one.
            await self.cancel(pid, request.request_id)
            last_error = frame.message if isinstance(frame, bus.Failed) else "unexpected first frame"
            log.warning("provider_declined", provider=pid, request_id=request.request_id, reason=last_error)
        raise CoordinatorUnavailable(f"No provider accepted the request for {request.model!r} ({last_error}).")

    def release(self, call: Call) -> None:
        self._router.close(call._stream)
        self._pool.unwatch(call.provider_id, call._watch)
        self._pool.note_finished(call.provider_id, call._epoch)

    async def cancel(self, provider_id: str, request_id: str) -> None:
        with contextlib.suppress(Exception):
            await self._nc.publish(subjects.cancel(provider_id), bus.encode(bus.Cancel(request_id=request_id)))
