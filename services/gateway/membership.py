"""Keeps a PoolView current from the bus: heartbeats, leaves, and expiry.

Only admitted providers enter the view (services/providers/admission.py): a
heartbeat from one not admitted yet is held until its verdict comes, a banned
or drained one is kept out, and a ban fails its running requests at once.

Only the models the operator's catalog lets it serve are routed to it
(services/catalog/catalog.py): the others are removed from the heartbeat the
view keeps, and a provider left with none stays out of the view. Each model's
verdict goes back to the provider and to the operator (services/catalog/verdicts.py);
an entry allowed or revoked re-decides every provider at once.

A heartbeat is a provider's claim, so it is size-limited before it is decoded,
bounded by the wire type as it is decoded (schemas/bus.py), rate-limited per
provider, and its capacity capped at what the operator allows that provider
(services/gateway/vetting.py). What breaks those rules is recorded against the
provider the subject names (NATS permissions pin who may publish there).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import msgspec
import structlog
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import bus, subjects
from schemas.tasks import cancel_and_wait
from services.catalog.catalog import Catalog
from services.catalog.verdicts import Verdicts
from services.gateway import vetting
from services.gateway.pool import PoolView
from services.providers.admission import Admission, Verdict
from services.providers.violations import Violations

log = structlog.get_logger("gateway.pool")

_HEARTBEAT = bus.decoder(bus.Heartbeat)
_LEAVE = bus.decoder(bus.Leave)

# Told of every admitted provider's heartbeat (as it reported it) and its models' verdicts.
Observer = Callable[[bus.Heartbeat, list[bus.ModelVerdict]], None]


class Membership:
    def __init__(
        self,
        nc: Nats,
        pool: PoolView,
        gateway_id: str,
        *,
        sweep_interval_s: float = 0.25,
        admission: Admission | None = None,
        violations: Violations | None = None,
        max_slots: int = bus.MAX_SLOTS,
        catalog: Catalog | None = None,
        verdicts: Verdicts | None = None,
    ) -> None:
        self._nc = nc
        self._pool = pool
        self._gateway_id = gateway_id
        self._sweep_interval_s = sweep_interval_s
        self._violations = violations
        self._max_slots = max_slots
        # Per provider: (tokens left in its heartbeat bucket, when it was last filled).
        self._buckets: dict[str, tuple[float, float]] = {}
        self._subs: list[Subscription] = []
        self._sweeper: asyncio.Task[None] | None = None
        # None: every provider is admitted (tests of the pool alone).
        self._admission = admission
        # The latest heartbeat of each provider awaiting its verdict, and when it came.
        self._held: dict[str, tuple[bus.Heartbeat, float]] = {}
        # None: every model is routed (tests of the pool alone).
        self._catalog = catalog
        self._verdicts = verdicts
        # The latest heartbeat of each admitted provider as it reported it (all its models), and when.
        self._reported: dict[str, tuple[bus.Heartbeat, float]] = {}
        self._observers: list[Observer] = []
        if admission is not None:
            admission.on_change(self._verdict_changed)
        if catalog is not None:
            catalog.on_change(self._catalog_changed)

    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    def reported(self, provider_id: str) -> bus.Heartbeat | None:
        """The provider's latest heartbeat as it sent it, if it is admitted and current."""
        entry = self._reported.get(provider_id)
        if entry is None or time.monotonic() - entry[1] > self._pool.heartbeat_misses * entry[0].interval_s:
            return None
        return entry[0]

    async def start(self) -> None:
        # A flood beyond these is dropped by the client library (slow consumer) rather than queued.
        self._subs.append(
            await self._nc.subscribe(
                subjects.HEARTBEATS, cb=self._on_heartbeat, pending_msgs_limit=65536, pending_bytes_limit=64 << 20
            )
        )
        self._subs.append(await self._nc.subscribe(subjects.LEAVES, cb=self._on_leave))
        await self._nc.publish(subjects.PROBE, bus.encode(bus.Probe(gateway_id=self._gateway_id)))
        self._sweeper = asyncio.create_task(self._sweep(), name="pool-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            await cancel_and_wait(self._sweeper)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _violation(self, provider_id: str, kind: str, detail: str) -> None:
        if self._violations is not None and subjects.valid_token(provider_id):
            self._violations.record(provider_id, kind, detail)

    def _within_rate(self, provider_id: str, now: float) -> bool:
        tokens, at = self._buckets.get(provider_id, (float(vetting.HEARTBEAT_BURST), now))
        tokens = min(float(vetting.HEARTBEAT_BURST), tokens + (now - at) * vetting.HEARTBEATS_PER_S)
        if tokens < 1:
            self._buckets[provider_id] = (tokens, now)
            return False
        self._buckets[provider_id] = (tokens - 1, now)
        return True

    async def _on_heartbeat(self, msg: Msg) -> None:
        # The subject names the sender (NATS permissions pin it): what is wrong is its doing.
        sender = subjects.parse_provider(msg.subject)
        now = time.monotonic()
        if not self._within_rate(sender, now):
            self._violation(sender, "heartbeat_flood", f"more than {vetting.HEARTBEATS_PER_S:g} heartbeats a second")
            return
        if len(msg.data) > vetting.MAX_HEARTBEAT_BYTES:
            self._violation(sender, "oversized_heartbeat", f"{len(msg.data)} bytes")
            return
        try:
            hb = _HEARTBEAT.decode(msg.data)
        except msgspec.DecodeError as exc:
            self._violation(sender, "bad_heartbeat", str(exc)[:200])
            return
        if hb.provider_id != sender:
            self._violation(sender, "heartbeat_id_mismatch", f"claimed to be {hb.provider_id!r}")
            return
        cap = self._admission.max_slots(sender) if self._admission is not None else None
        hb, problems = vetting.vet_heartbeat(hb, self._max_slots if cap is None else cap)
        for problem in problems:
            self._violation(sender, problem.kind, problem.detail)
        self._consider(hb, now)

    def _consider(self, hb: bus.Heartbeat, received: float) -> None:
        pid = hb.provider_id
        if self._admission is not None:
            verdict = self._admission.check(pid)
            if verdict is not Verdict.ADMITTED:
                self._unreport(pid)
                if verdict is Verdict.PENDING:
                    self._held[pid] = (hb, received)
                if pid in self._pool.providers:
                    self._pool.withdraw(pid, fail_in_flight=verdict is Verdict.BANNED)
                return
        self._reported[pid] = (hb, received)
        routed, verdicts = self._judge(hb)
        for observer in self._observers:
            observer(hb, verdicts)
        known = pid in self._pool.providers
        if hb.models and not routed.models and not hb.draining:
            # Nothing it serves may be routed to it: out of the view (its running requests finish).
            if known:
                self._pool.withdraw(pid, fail_in_flight=False)
                log.info("provider_unrouted", provider=pid, models={v.model: v.status for v in verdicts})
            return
        self._pool.observe(routed)
        if not known and not hb.draining:
            log.info(
                "provider_joined",
                provider=pid,
                models=[m.id for m in routed.models],
                slots=hb.slots,
                unrouted={v.model: v.status for v in verdicts if not v.routed},
            )

    def _judge(self, hb: bus.Heartbeat) -> tuple[bus.Heartbeat, list[bus.ModelVerdict]]:
        """The heartbeat with only the models the catalog routes, and every model's verdict."""
        if self._catalog is None:
            return hb, []
        verdicts = [self._catalog.verdict(m) for m in hb.models]
        if self._verdicts is not None:
            self._verdicts.update(hb.provider_id, hb.boot_id, verdicts)
        if all(v.routed for v in verdicts):
            return hb, verdicts
        models = [m for m, v in zip(hb.models, verdicts, strict=True) if v.routed]
        return msgspec.structs.replace(hb, models=models), verdicts

    def _catalog_changed(self) -> None:
        """An entry was allowed or revoked: re-decide every current provider now, not at its next heartbeat."""
        for pid in list(self._reported):
            hb = self.reported(pid)
            if hb is None or hb.draining:
                continue
            routed, verdicts = self._judge(hb)
            state = self._pool.providers.get(pid)
            if state is not None and hb.models and not routed.models:
                self._pool.withdraw(pid, fail_in_flight=False)
                log.info("provider_unrouted", provider=pid, models={v.model: v.status for v in verdicts})
            elif state is not None:
                state.heartbeat = msgspec.structs.replace(state.heartbeat, models=routed.models)
            elif routed.models:
                self._consider(hb, self._reported[pid][1])

    def _verdict_changed(self, pid: str, verdict: Verdict) -> None:
        if verdict is Verdict.ADMITTED:
            held = self._held.pop(pid, None)
            # Route it now rather than at its next heartbeat, if the one we hold is still current.
            if held is not None and time.monotonic() - held[1] < held[0].interval_s:
                self._consider(*held)
            return
        if verdict is Verdict.BANNED:
            log.warning("provider_banned", provider=pid, in_pool=pid in self._pool.providers)
        elif verdict is Verdict.DRAINING:
            log.info("provider_drained", provider=pid, in_pool=pid in self._pool.providers)
        self._held.pop(pid, None)
        self._unreport(pid)
        self._pool.withdraw(pid, fail_in_flight=verdict is Verdict.BANNED)

    def _unreport(self, pid: str) -> None:
        """The provider is not admitted (any more): forget its claims, and stop telling it about them."""
        if self._reported.pop(pid, None) is not None and self._verdicts is not None:
            self._verdicts.withdraw(pid)

    async def _on_leave(self, msg: Msg) -> None:
        try:
            leave = _LEAVE.decode(msg.data)
        except msgspec.DecodeError:
            return
        if leave.provider_id != subjects.parse_provider(msg.subject):
            return
        reported = self._reported.get(leave.provider_id)
        if reported is not None and reported[0].boot_id == leave.boot_id:
            del self._reported[leave.provider_id]
        if self._pool.remove(leave.provider_id, leave.boot_id):
            log.info("provider_left", provider=leave.provider_id)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            for pid in self._pool.expire():
                log.warning("provider_lost", provider=pid, reason="missed_heartbeats")
            now = time.monotonic()
            for pid in [
                p for p, (hb, t) in self._held.items() if now - t > self._pool.heartbeat_misses * hb.interval_s
            ]:
                del self._held[pid]
            for pid in [
                p for p, (hb, t) in self._reported.items() if now - t > self._pool.heartbeat_misses * hb.interval_s
            ]:
                del self._reported[pid]
            # Buckets full again (untouched for a minute) say nothing: forget them, so ids bound nothing.
            for pid in [p for p, (_, at) in self._buckets.items() if now - at > 60.0]:
                del self._buckets[pid]
