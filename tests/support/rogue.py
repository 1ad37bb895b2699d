"""A hostile provider: logs in to the real NATS with its own real credentials and speaks the
protocol by hand, saying whatever a test tells it to (heartbeats, acceptances, frames)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import nats
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg

from infra.nats_auth import SecuredNats
from schemas import bus, subjects

# What the rogue does with one request: it gets the request and a `send(frame)` (frames are
# encoded as given: a Struct's fields are not validated on construction, so lies go out as is).
Answer = Callable[[bus.InferenceRequest, Callable[[Any], Awaitable[None]]], Awaitable[None]]

_REQUEST = bus.decoder(bus.InferenceRequest)


def heartbeat(provider_id: str, model: str, **overrides: Any) -> bus.Heartbeat:
    """A heartbeat that makes a provider look like the best choice in the pool."""
    fields: dict[str, Any] = {
        "provider_id": provider_id,
        "daemon_version": "rogue",
        "boot_id": "rogue-boot",
        "models": [bus.ModelInfo(id=model, context_length=1 << 16, structured_output=True)],
        "slots": 64,
        "slots_free": 64,
        "queue_depth": 0,
        "queue_limit": 16,
        "decode_tps": 1e6,
        "interval_s": 0.5,
        "sent_at_ms": int(time.time() * 1000),
    }
    fields.update(overrides)
    return bus.Heartbeat(**fields)


@dataclass
class Rogue:
    nats: SecuredNats
    provider_id: str
    model: str
    answer: Answer
    # The heartbeat it sends every interval (raw bytes to send garbage); None: none at all.
    beat: Callable[[], bytes] | None = None
    requests: list[bus.InferenceRequest] = field(default_factory=list)
    # False: it heartbeats but never subscribes to its work subject (a daemon that just died, to NATS).
    listens: bool = True
    _nc: Nats | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.beat is None:
            self.beat = lambda: bus.encode(heartbeat(self.provider_id, self.model))

    @property
    def nc(self) -> Nats:
        assert self._nc is not None
        return self._nc

    async def start(self) -> None:
        token = await asyncio.to_thread(self.nats.provider_token, self.provider_id)
        self._nc = await nats.connect(self.nats.url, token=token, allow_reconnect=False)
        if self.listens:
            await self.nc.subscribe(subjects.work(self.provider_id), cb=self._on_work)
        self._tasks.append(asyncio.create_task(self._beats()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.publish(
                    subjects.leave(self.provider_id),
                    bus.encode(bus.Leave(provider_id=self.provider_id, boot_id="rogue-boot")),
                )
                await self.nc.flush()
            await self.nc.close()

    async def publish_heartbeat(self, data: bytes) -> None:
        await self.nc.publish(subjects.heartbeat(self.provider_id), data)

    async def _beats(self) -> None:
        while True:
            if self.beat is not None:
                with contextlib.suppress(Exception):
                    await self.publish_heartbeat(self.beat())
            await asyncio.sleep(0.5)

    async def _on_work(self, msg: Msg) -> None:
        request = _REQUEST.decode(msg.data)
        self.requests.append(request)

        async def send(frame: Any) -> None:
            await self.nc.publish(msg.reply, frame if isinstance(frame, bytes) else bus.encode(frame))

        await self.answer(request, send)


@contextlib.asynccontextmanager
async def rogue_in_pool(rogue: Rogue, base_url: str, *, providers: int) -> AsyncIterator[Rogue]:
    """Start the rogue and wait (up to 15 s) until the pool shows `providers` providers for its model."""
    await rogue.start()
    try:
        deadline = time.monotonic() + 15.0
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                body = (await client.get(f"{base_url}/v1/status")).json()
                served = next((m["providers"] for m in body["models"] if m["id"] == rogue.model), 0)
                if served >= providers:
                    break
                assert time.monotonic() < deadline, f"the rogue never joined the pool: {body}"
                await asyncio.sleep(0.1)
        yield rogue
    finally:
        await rogue.stop()
