"""`last_used_at` of keys, written in batches off the request path.

Writing it on every request would cost the database round trip the key cache
exists to avoid, so uses are collected in memory and flushed every few seconds
in one statement (and once more at shutdown).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import structlog

from schemas.tasks import cancel_and_wait
from services.keys.store import record_last_used

log = structlog.get_logger("keys.last_used")


class LastUsed:
    def __init__(self, db: asyncpg.Pool, *, interval_s: float) -> None:
        self._db = db
        self._interval_s = interval_s
        self._pending: dict[int, datetime] = {}
        self._task: asyncio.Task[None] | None = None

    def touch(self, key_id: int) -> None:
        self._pending[key_id] = datetime.now(UTC)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="key-last-used")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            await record_last_used(self._db, batch)
        except Exception as exc:
            # Keep them for the next round; a newer use of the same key wins.
            log.warning("last_used_flush_failed", keys=len(batch), error=type(exc).__name__)
            self._pending = {**batch, **self._pending}

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.flush()
