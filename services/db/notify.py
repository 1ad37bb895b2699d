"""One Postgres LISTEN channel on a dedicated connection that comes back after a loss.

Triggers send a NOTIFY inside the transaction that changes a row, so the notice
leaves exactly when the change commits, whoever wrote it. While the connection
is not known to be alive, `healthy` is False and a caller's cache may have
missed a notice; every (re)connection calls `on_reset` so the caller can
distrust what it cached before. Used for API-key revocations
(services/keys/revocations.py) and provider admission changes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import asyncpg
import structlog

from schemas.tasks import cancel_and_wait

log = structlog.get_logger("db.notify")


class NotifyListener:
    def __init__(
        self,
        dsn: str,
        channel: str,
        *,
        on_notice: Callable[[str], None],
        on_reset: Callable[[], None],
        application_name: str,
        probe_interval_s: float = 5.0,
        retry_s: float = 0.5,
        ready_timeout_s: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self.channel = channel
        self._on_notice = on_notice
        self._on_reset = on_reset
        self._application_name = application_name
        self._probe_interval_s = probe_interval_s
        self._retry_s = retry_s
        self._ready_timeout_s = ready_timeout_s
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.healthy = False

    async def start(self) -> None:
        """Begin listening; returns once listening (or after a while, still retrying behind)."""
        self._task = asyncio.create_task(self._run(), name=f"listen-{self.channel}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout=self._ready_timeout_s)
        if not self.healthy:
            log.warning("listener_not_ready", channel=self.channel)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self._close()

    async def _run(self) -> None:
        delay = self._retry_s
        while True:
            try:
                await self._listen()
                delay = self._retry_s
                await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("listener_lost", channel=self.channel, error=type(exc).__name__, retry_in_s=delay)
            self._mark_lost()
            await self._close()
            await asyncio.sleep(delay)
            # Quick to come back after a blip, quiet during a long outage.
            delay = min(delay * 2, 5.0)

    async def _listen(self) -> None:
        self._lost.clear()
        conn = await asyncpg.connect(
            self._dsn, timeout=10, server_settings={"application_name": self._application_name}
        )
        self._conn = conn
        conn.add_termination_listener(lambda _conn: self._mark_lost())
        await conn.add_listener(self.channel, self._notified)
        # Anything cached before this point may have missed a notice.
        self._on_reset()
        self.healthy = True
        self._ready.set()
        log.info("listener_ready", channel=self.channel)

    async def _watch(self) -> None:
        """Until the connection is lost; a periodic probe also catches a silently dead peer."""
        assert self._conn is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout=self._probe_interval_s)
            if self._lost.is_set():
                return
            await self._conn.fetchval("SELECT 1", timeout=max(1.0, self._probe_interval_s / 2))

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._on_notice(str(payload))

    def _mark_lost(self) -> None:
        if self.healthy:
            self.healthy = False
            self._on_reset()
        self._lost.set()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)
