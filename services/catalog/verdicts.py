"""Telling each provider (and the operator) how the pool sees its models, when that changes.

A gateway judges every model of every admitted provider's heartbeat against the catalog
(services/catalog/catalog.py). When a provider's verdicts change (or its daemon restarts,
or a minute passes), this replica sends the provider a `bus.PoolNotice` on its own subject
(schemas/subjects.py: notices), which its daemon shows in `/admin/status`, and writes the
verdicts to `provider_models` for `mac-provider admin models list`. Both happen in a
background flush, never on the heartbeat path; every replica does it, and the write only
touches rows whose verdict changed, so replicas agreeing cost one no-op statement each.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg
import structlog
from nats.aio.client import Client as Nats

from schemas import bus, subjects
from schemas.tasks import cancel_and_wait
from services.catalog import store

log = structlog.get_logger("gateway.verdicts")

# A provider whose verdicts did not change hears them again this often (its daemon may have missed one).
_REFRESH_S = 60.0
# Providers not heard of for this long are forgotten.
_FORGET_S = 600.0


@dataclass(slots=True)
class _Known:
    boot_id: str
    verdicts: tuple[bus.ModelVerdict, ...]
    seen_at: float
    sent_at: float = float("-inf")
    recorded: tuple[bus.ModelVerdict, ...] | None = None
    # Not admitted any more (banned, suspended, drained): nothing more is said about it, except
    # a verdict `forced` by this replica's canary, which must be the last word the provider hears.
    withdrawn: bool = False
    forced: bool = False


class Verdicts:
    def __init__(self, nc: Nats, db: asyncpg.Pool | None, *, flush_s: float = 0.25) -> None:
        self._nc = nc
        self._db = db
        self._flush_s = flush_s
        self._known: dict[str, _Known] = {}
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="model-verdicts")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    def current(self, provider_id: str) -> tuple[bus.ModelVerdict, ...]:
        known = self._known.get(provider_id)
        return known.verdicts if known is not None else ()

    def update(self, provider_id: str, boot_id: str, verdicts: list[bus.ModelVerdict]) -> None:
        """The provider's verdicts as of its latest heartbeat (no I/O: sent and written by the flush)."""
        now = time.monotonic()
        new = tuple(verdicts)
        known = self._known.get(provider_id)
        if known is None:
            known = self._known[provider_id] = _Known(boot_id, new, now)
            self._queue(provider_id)
            return
        known.seen_at = now
        if known.forced and not known.withdrawn:
            return  # this replica's canary verdict stands (its suspension is on its way here)
        readmitted, known.withdrawn, known.forced = known.withdrawn, False, False
        if readmitted or known.boot_id != boot_id or known.verdicts != new or now - known.sent_at > _REFRESH_S:
            known.boot_id, known.verdicts = boot_id, new
            self._queue(provider_id)

    def withdraw(self, provider_id: str) -> None:
        """The provider is not admitted any more: say nothing more about it (a pending notice is dropped).

        Otherwise a replica that judged its heartbeat a moment before a canary suspended it could
        tell it "verified" after the canary's replica told it why it was suspended.
        """
        known = self._known.get(provider_id)
        if known is None:
            return
        known.withdrawn = True
        # Another replica may write its verdicts meanwhile: if it comes back, write them again.
        known.recorded = None
        if not known.forced:
            self._pending.discard(provider_id)

    def override(self, provider_id: str, verdict: bus.ModelVerdict) -> None:
        """Replace one model's verdict now (a canary failed): the provider and the operator hear at once."""
        known = self._known.get(provider_id)
        if known is None:
            known = self._known[provider_id] = _Known("", (), time.monotonic())
        known.verdicts = (*(v for v in known.verdicts if v.model != verdict.model), verdict)
        known.forced = True
        self._queue(provider_id)

    def _queue(self, provider_id: str) -> None:
        self._pending.add(provider_id)
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self._flush_s)  # a burst of changes goes out as one flush
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("verdicts_flush_failed", error=type(exc).__name__)
                await asyncio.sleep(1.0)
                self._wake.set()

    async def tell_now(self) -> None:
        """Send what is pending now, and wait until the server has it (before cutting a provider off)."""
        await self.flush()
        await self._nc.flush(timeout=2)

    async def flush(self) -> None:
        now = time.monotonic()
        for pid in [p for p, k in self._known.items() if now - k.seen_at > _FORGET_S]:
            del self._known[pid]
            self._pending.discard(pid)
        pending, self._pending = self._pending, set()
        for pid in sorted(pending):
            known = self._known.get(pid)
            if known is None or (known.withdrawn and not known.forced):
                continue
            verdicts = known.verdicts
            notice = bus.PoolNotice(provider_id=pid, models=list(verdicts), sent_at_ms=int(time.time() * 1000))
            try:
                await self._nc.publish(subjects.notices(pid), bus.encode(notice))
            except Exception:
                self._pending.add(pid)
                raise  # NATS is down: the loop tries again
            known.sent_at = now
            if self._db is None or known.recorded == verdicts:
                continue
            try:
                await store.record_verdicts(
                    self._db, pid, [(v.model, v.weights_sha256, v.status, v.routed, v.detail) for v in verdicts]
                )
                known.recorded = verdicts
            except asyncpg.PostgresError as exc:
                # This provider's rows only (e.g. it was deleted meanwhile): the others are still written.
                log.warning("verdicts_not_recorded", provider=pid, error=type(exc).__name__)
