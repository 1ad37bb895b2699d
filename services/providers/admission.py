"""Which providers this replica may route to: pinned or provisionally admitted, not banned, not drained.

Decisions live in Postgres (`providers`) and are cached here, so a heartbeat
costs a dict lookup, not a query. What reaches Postgres:

- an id this replica has never seen: one batched statement records it (as
  pending) and reads its status;
- a pending id, while the shared bucket may hold a token: one attempt to admit
  it (`store.try_admit`); when the bucket is empty this replica waits until it
  refills before trying any pending id again, so a flood of unknown ids costs
  a handful of statements a minute;
- the providers heard from lately, every `touch_every_s`, as `last_seen`.

Pins, bans, drains and other replicas' admissions arrive at once by NOTIFY;
cached decisions are also re-read after `cache_ttl_s` (sooner while the
listener is down, when a notice may have been missed).
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import structlog

from schemas.tasks import cancel_and_wait
from services.db.notify import NotifyListener
from services.providers import store

log = structlog.get_logger("gateway.admission")

# While the NOTIFY listener is down, cached decisions are re-read this often at least.
_UNHEALTHY_TTL_S = 5.0
# Ids looked up in one statement.
_BATCH = 500


class Verdict(enum.Enum):
    ADMITTED = "admitted"
    # Admitted, but an operator drained it: its running requests finish, it gets no new ones.
    DRAINING = "draining"
    BANNED = "banned"
    # Not admitted (yet), or not known to this replica yet.
    PENDING = "pending"


def verdict_of(status: str, draining: bool) -> Verdict:
    if status in ("banned", "suspended"):
        return Verdict.BANNED
    if status not in ("pinned", "provisional"):
        return Verdict.PENDING
    return Verdict.DRAINING if draining else Verdict.ADMITTED


@dataclass(slots=True)
class _Entry:
    verdict: Verdict
    checked_at: float
    # Set by a NOTIFY: newer than any query that was already under way when it came.
    by_notice: bool = False
    # The operator's slot cap for this provider (None: the default).
    max_slots: int | None = None


ChangeCallback = Callable[[str, Verdict], None]


class Admission:
    def __init__(
        self,
        db: asyncpg.Pool,
        dsn: str,
        *,
        per_minute: int,
        cache_ttl_s: float = 30.0,
        touch_every_s: float = 15.0,
        batch_delay_s: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self.per_minute = per_minute
        self._cache_ttl_s = cache_ttl_s
        self._touch_every_s = touch_every_s
        self._batch_delay_s = batch_delay_s
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        self._lookups: set[str] = set()
        self._attempts: dict[str, None] = {}  # ordered: first heard, first tried
        self._seen: set[str] = set()
        # No provisional admission is tried before this (the bucket was empty).
        self._bucket_empty_until = 0.0
        self._wake = asyncio.Event()
        self._callbacks: list[ChangeCallback] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._listener = NotifyListener(
            dsn,
            store.CHANNEL,
            on_notice=self._notified,
            on_reset=self._reset,
            application_name="mp-provider-admission",
        )

    def on_change(self, callback: ChangeCallback) -> None:
        """Call `callback(provider_id, verdict)` whenever a provider's verdict changes here."""
        self._callbacks.append(callback)

    async def start(self) -> None:
        await self._listener.start()
        self._tasks = [
            asyncio.create_task(self._decide_loop(), name="admission"),
            asyncio.create_task(self._touch_loop(), name="admission-touch"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        await self._listener.stop()

    # ---- the heartbeat path: no I/O ---------------------------------------------------------

    def check(self, provider_id: str) -> Verdict:
        """The cached verdict (PENDING while unknown); queues whatever Postgres work it calls for."""
        self._seen.add(provider_id)
        entry = self._cache.get(provider_id)
        now = self._clock()
        if entry is None:
            self._queue_lookup(provider_id)
            return Verdict.PENDING
        ttl = self._cache_ttl_s if self._listener.healthy else min(self._cache_ttl_s, _UNHEALTHY_TTL_S)
        if now - entry.checked_at > ttl:
            self._queue_lookup(provider_id)
        if entry.verdict is Verdict.PENDING and self._may_try(now):
            self._attempts[provider_id] = None
            self._wake.set()
        return entry.verdict

    def max_slots(self, provider_id: str) -> int | None:
        """The operator's slot cap for this provider, if one was set (cached; no I/O)."""
        entry = self._cache.get(provider_id)
        return entry.max_slots if entry is not None else None

    def _may_try(self, now: float) -> bool:
        return self.per_minute > 0 and now >= self._bucket_empty_until

    def _queue_lookup(self, provider_id: str) -> None:
        self._lookups.add(provider_id)
        self._wake.set()

    # ---- decisions ----------------------------------------------------------------------------

    def _apply(
        self, provider_id: str, verdict: Verdict, *, asked_at: float | None = None, max_slots: int | None = None
    ) -> None:
        """Cache a verdict: from a notice (`asked_at` None), or from a query sent at `asked_at`."""
        old = self._cache.get(provider_id)
        if asked_at is not None and old is not None and old.by_notice and old.checked_at >= asked_at:
            # A notice came while the query ran, so the query's snapshot may predate it. Every
            # status change sends one, so the last notice is the latest truth: keep it.
            return
        self._cache[provider_id] = _Entry(verdict, self._clock(), by_notice=asked_at is None, max_slots=max_slots)
        if old is None or old.verdict is not verdict:
            for callback in self._callbacks:
                callback(provider_id, verdict)

    def _notified(self, payload: str) -> None:
        try:
            notice = json.loads(payload)
            provider_id, status, draining = str(notice["id"]), str(notice["status"]), bool(notice["draining"])
            raw_slots = notice.get("max_slots")
            max_slots = None if raw_slots is None else int(raw_slots)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("admission_notice_unreadable")
            self._reset()
            return
        verdict = verdict_of(status, draining)
        if verdict is not Verdict.PENDING or provider_id in self._cache:
            self._apply(provider_id, verdict, max_slots=max_slots)

    def _reset(self) -> None:
        # A notice may have been missed: re-read every decision on its provider's next heartbeat.
        for entry in self._cache.values():
            entry.checked_at = float("-inf")

    async def _decide_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self._batch_delay_s)  # let a burst of heartbeats gather into one batch
            try:
                await self._look_up()
                await self._admit()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("admission_db_error", error=type(exc).__name__)
                await asyncio.sleep(1.0)

    async def _look_up(self) -> None:
        while self._lookups:
            batch = sorted(self._lookups)[:_BATCH]
            self._lookups.difference_update(batch)
            asked_at = self._clock()
            found = await store.sight(self._db, batch)
            for provider_id, state in found.items():
                verdict = verdict_of(state.status, state.draining)
                self._apply(provider_id, verdict, asked_at=asked_at, max_slots=state.max_slots)
                if verdict is Verdict.PENDING and self._may_try(self._clock()):
                    self._attempts[provider_id] = None

    async def _admit(self) -> None:
        while self._attempts:
            provider_id = next(iter(self._attempts))
            del self._attempts[provider_id]
            now = self._clock()
            if not self._may_try(now):
                self._attempts.clear()
                return
            entry = self._cache.get(provider_id)
            if entry is None or entry.verdict is not Verdict.PENDING:
                continue
            asked_at = self._clock()
            attempt = await store.try_admit(self._db, provider_id, self.per_minute)
            if attempt.admitted:
                log.info("provider_admitted", provider=provider_id, how="provisional")
                entry = self._cache.get(provider_id)
                self._apply(
                    provider_id, Verdict.ADMITTED, asked_at=asked_at, max_slots=entry.max_slots if entry else None
                )
            elif attempt.contended:
                # Not pending any more: another replica or an operator decided; its notice may
                # have come already (or will), but make sure this replica reads the outcome.
                self._queue_lookup(provider_id)
            else:
                self._bucket_empty_until = self._clock() + max(0.05, attempt.retry_after_s)

    async def _touch_loop(self) -> None:
        while True:
            await asyncio.sleep(self._touch_every_s)
            seen, self._seen = self._seen, set()
            if not seen:
                continue
            try:
                await store.touch(self._db, list(seen), older_than_s=self._touch_every_s * 0.5)
            except Exception as exc:
                log.warning("admission_touch_failed", error=type(exc).__name__)
