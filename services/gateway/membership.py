"""Keeps a PoolView current from the bus: heartbeats, leaves, and expiry."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import structlog
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import bus, subjects
from services.gateway.pool import PoolView

log = structlog.get_logger("gateway.pool")

_HEARTBEAT = bus.decoder(bus.Heartbeat)
_LEAVE = bus.decoder(bus.Leave)


class Membership:
    def __init__(self, nc: Nats, pool: PoolView, gateway_id: str, *, sweep_interval_s: float = 0.25) -> None:
        self._nc = nc
        self._pool = pool
        self._gateway_id = gateway_id
        self._sweep_interval_s = sweep_interval_s
        self._subs: list[Subscription] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._subs.append(await self._nc.subscribe(subjects.HEARTBEATS, cb=self._on_heartbeat))
        self._subs.append(await self._nc.subscribe(subjects.LEAVES, cb=self._on_leave))
        await self._nc.publish(subjects.PROBE, bus.encode(bus.Probe(gateway_id=self._gateway_id)))
        self._sweeper = asyncio.create_task(self._sweep(), name="pool-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = _HEARTBEAT.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("bad_heartbeat", subject=msg.subject)
            return
        # The subject names the sender (NATS permissions pin it); the body must agree.
        if hb.provider_id != subjects.parse_provider(msg.subject):
            log.warning("heartbeat_id_mismatch", subject=msg.subject, claimed=hb.provider_id)
            return
        known = hb.provider_id in self._pool.providers
        self._pool.observe(hb)
        if not known and not hb.draining:
            log.info("provider_joined", provider=hb.provider_id, models=[m.id for m in hb.models], slots=hb.slots)

    async def _on_leave(self, msg: Msg) -> None:
        try:
            leave = _LEAVE.decode(msg.data)
        except msgspec.DecodeError:
            return
        if leave.provider_id == subjects.parse_provider(msg.subject) and self._pool.remove(
            leave.provider_id, leave.boot_id
        ):
            log.info("provider_left", provider=leave.provider_id)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            for pid in self._pool.expire():
                log.warning("provider_lost", provider=pid, reason="missed_heartbeats")
