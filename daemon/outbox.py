"""Frames for one gateway made in the same loop turn leave as one NATS message (a `Bundle`).

A batched decode step hands a token to every running request at once, and each
request's sender then has one frame for its gateway: one message per frame was
a parse, a lookup and a hand-off each at the gateway, the daemon and
nats-server. Here the first frame for a gateway in a loop turn goes at once, on
its own reply subject (exactly as without bundles: a lone stream waits for
nothing); the ones after it in the same turn queue until the sending task runs,
as soon as that turn's senders are done (nothing waits for more to come), and go
out per gateway as one message. Only requests whose gateway asked for bundles
(`InferenceRequest.bundle`) come here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from nats.aio.client import Client as Nats

from schemas import bus

log = structlog.get_logger("outbox")

# A bundle stays far below NATS's max payload and the gateway's per-frame byte bound, whatever its frames.
MAX_BUNDLE_BYTES = 256 * 1024


class Outbox:
    def __init__(self, nc: Nats) -> None:
        self._nc = nc
        # Per bundle subject (one per gateway): (reply subject, request id, encoded frame), in order made.
        self._pending: dict[str, list[tuple[str, str, bytes]]] = {}
        self._wake = asyncio.Event()
        self._turn_ending = False
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._errors_logged: dict[str, float] = {}
        self.bundles = 0
        self.bundled_frames = 0

    def put(self, bundle_subject: str, reply_subject: str, request_id: str, frame: bytes) -> bool:
        """Queue a frame, to be sent once this loop turn's senders have run (in order, per request).

        False: the first frame for its gateway this turn is not queued; the caller publishes it at once
        on its reply subject (a lone stream then waits for nothing, not even this outbox's task).
        Nothing of that gateway is queued then, so nothing can overtake it.
        """
        return self.put_all(bundle_subject, reply_subject, request_id, (frame,))

    def put_all(self, bundle_subject: str, reply_subject: str, request_id: str, frames: tuple[bytes, ...]) -> bool:
        """`put` for frames of one request made together: False, the caller publishes them at once, as one
        message (`at_once`)."""
        items = self._pending.get(bundle_subject)
        # While a flush runs (its lock held), even a first frame queues: a publish there may wait.
        if items is None and not self._lock.locked():
            # An empty list marks the gateway as served this turn: its next frames queue behind.
            self._pending[bundle_subject] = []
            if not self._turn_ending:
                self._turn_ending = True
                asyncio.get_running_loop().call_soon(self._end_turn)
            return False
        if items is None:
            items = self._pending[bundle_subject] = []
        items.extend((reply_subject, request_id, frame) for frame in frames)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outbox")
        self._wake.set()
        return True

    def _end_turn(self) -> None:
        """The turn is over: a gateway whose only frame went at once takes its next one at once again."""
        self._turn_ending = False
        for subject in [subject for subject, items in self._pending.items() if not items]:
            del self._pending[subject]

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Send everything queued now (also what the loop has not come round to yet)."""
        # One flush at a time (the task's and `close`'s), and while a publish could wait (nats-py's buffer
        # full), a frame made meanwhile queues behind: nothing overtakes what is being sent.
        async with self._lock:
            while self._pending:
                pending, self._pending = self._pending, {}
                for subject, items in pending.items():
                    for part in _parts(items) if items else ():
                        await self._send(subject, part)

    async def _send(self, subject: str, part: list[tuple[str, str, bytes]]) -> None:
        try:
            if len(part) == 1:
                reply_subject, _, frame = part[0]
                await self._nc.publish(reply_subject, frame)
            else:
                await self._nc.publish(subject, bus.encode_bundle([(rid, frame) for _, rid, frame in part]))
                self.bundles += 1
                self.bundled_frames += len(part)
        except Exception as exc:
            # The connection is closed or its buffer is full (a long outage): these frames are lost, and
            # the gateway fails their requests over or out as it would a provider gone silent.
            now, kind = time.monotonic(), type(exc).__name__
            if now - self._errors_logged.get(kind, float("-inf")) >= 60.0:
                self._errors_logged[kind] = now
                log.warning("frames_not_sent", error=kind, frames=len(part))

    async def close(self) -> None:
        """Send what is queued, then stop the sending task."""
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def at_once(bundle_subject: str, reply_subject: str, request_id: str, frames: tuple[bytes, ...]) -> tuple[str, bytes]:
    """(subject, payload) of frames of one request sent at once: a lone frame on its reply subject, as
    without bundles; several as one bundle."""
    if len(frames) == 1:
        return reply_subject, frames[0]
    return bundle_subject, bus.encode_bundle([(request_id, frame) for frame in frames])


def _parts(items: list[tuple[str, str, bytes]]) -> list[list[tuple[str, str, bytes]]]:
    """`items` cut into bundles within MAX_BUNDLE frames and MAX_BUNDLE_BYTES (order kept)."""
    parts: list[list[tuple[str, str, bytes]]] = [[]]
    size = 0
    for item in items:
        cost = len(item[2]) + len(item[1]) + 8
        if parts[-1] and (len(parts[-1]) >= bus.MAX_BUNDLE or size + cost > MAX_BUNDLE_BYTES):
            parts.append([])
            size = 0
        parts[-1].append(item)
        size += cost
    return parts
