"""A revoked token or a banned provider loses its NATS connections at once, on every node.

Every replica LISTENs for token revocations (migration 0007) and provider status
changes (banned / suspended), asks every server of the cluster for that
provider's connections (`$SYS.REQ.SERVER.PING.CONNZ` filtered by its user name
and our account; each node answers for itself) and closes each on its own node
(`$SYS.REQ.SERVER.<server id>.KICK {"cid": ...}`, nats-server >= 2.10), from a
login in the system account. The reconnection then meets the callout, which
refuses it. A revoked token closes all of its provider's connections; one still
holding another live token is let back in at once.

A ban waits a moment (`ban_grace_s`) so the cancels every gateway sends the daemon
for its running requests reach it first. A login the callout decided just before
the change may only land after the first sweep, so a second sweep follows once
the server's auth timeout has passed. When
the LISTEN connection comes (back) up, a notice may have been missed: every
provider connection is then checked against Postgres, as it is every
`recheck_s` anyway (what bounds a provider's stay after a change whose notice
never came; user JWTs do not expire, see services/settings.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from nats.aio.client import Client as Nats

from schemas import subjects
from schemas.permissions import PROVIDER_USER_PREFIX, provider_user
from services.db.notify import NotifyListener
from services.providers import store, tokens

log = structlog.get_logger("natsauth")

_SHUT_OUT = ("banned", "suspended")
_PAGE = 1024
_MAX_PAGES = 64


@dataclass(frozen=True, slots=True)
class Connection:
    server_id: str
    cid: int
    user: str


class Disconnector:
    def __init__(
        self,
        nc: Nats,  # logged in to the system account
        db: asyncpg.Pool,
        dsn: str,
        *,
        account: str,
        recheck_s: float = 60.0,
        ban_grace_s: float = 0.3,
        settle_s: float = 3.0,
        gather_s: float = 0.5,
    ) -> None:
        self._nc = nc
        self._recheck_s = recheck_s
        self._ban_grace_s = ban_grace_s
        self._db = db
        self._account = account
        self._settle_s = settle_s
        self._gather_s = gather_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._reconcile = asyncio.Event()
        self._listeners = [
            NotifyListener(
                dsn,
                tokens.REVOKED_CHANNEL,
                on_notice=self._token_revoked,
                on_reset=self._reconcile.set,
                application_name="mp-natsauth-revocations",
            ),
            NotifyListener(
                dsn,
                store.CHANNEL,
                on_notice=self._provider_changed,
                on_reset=self._reconcile.set,
                application_name="mp-natsauth-bans",
            ),
        ]

    async def start(self) -> None:
        self._spawn(self._reconcile_loop())
        self._spawn(self._recheck_loop())
        for listener in self._listeners:
            await listener.start()

    async def stop(self) -> None:
        for listener in self._listeners:
            await listener.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- notices ------------------------------------------------------------------------------

    def _token_revoked(self, payload: str) -> None:
        notice = _json(payload)
        provider_id = notice.get("provider_id")
        if isinstance(provider_id, str):
            self._spawn(self.disconnect(provider_id, "token revoked"))
        else:
            self._reconcile.set()

    def _provider_changed(self, payload: str) -> None:
        notice = _json(payload)
        provider_id, status = notice.get("id"), notice.get("status")
        if not isinstance(provider_id, str) or not isinstance(status, str):
            self._reconcile.set()
        elif status in _SHUT_OUT:
            # Every gateway hears the same notice and cancels the provider's running requests over
            # NATS; let those cancels reach the daemon before it is cut off (it stops computing).
            self._spawn(self.disconnect(provider_id, status, after_s=self._ban_grace_s))

    # ---- closing connections ----------------------------------------------------------------

    async def disconnect(self, provider_id: str, reason: str, *, after_s: float = 0.0) -> None:
        try:
            user = provider_user(provider_id)
        except ValueError:
            return  # never a connection: the callout refuses ids that are not subject tokens
        if after_s > 0:
            await asyncio.sleep(after_s)
        closed, ms = await self._close_where({"user": user, "acc": self._account}, _every)
        log.info("provider_disconnected", provider=provider_id, reason=reason, connections=closed, ms=ms)
        await asyncio.sleep(self._settle_s)
        late, _ = await self._close_where({"user": user, "acc": self._account}, _every)
        if late:
            log.info("provider_disconnected", provider=provider_id, reason=reason, connections=late, late=True)

    async def _reconcile_loop(self) -> None:
        while True:
            await self._reconcile.wait()
            await asyncio.sleep(0.2)  # both listeners reset together: one pass
            self._reconcile.clear()
            try:
                closed, _ = await self._close_where({"acc": self._account, "auth": True}, self._without_access)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("provider_reconcile_failed", error=type(exc).__name__)
                continue
            if closed:
                log.info("provider_disconnected", reason="no access on reconcile", connections=closed)

    async def _recheck_loop(self) -> None:
        while True:
            await asyncio.sleep(self._recheck_s)
            self._reconcile.set()

    async def _without_access(self, conns: list[Connection]) -> list[Connection]:
        prefix = PROVIDER_USER_PREFIX
        by_provider = {c.user.removeprefix(prefix) for c in conns if c.user.startswith(prefix)}
        if not by_provider:
            return []
        shut = {provider_user(p) for p in await tokens.without_access(self._db, sorted(by_provider))}
        return [c for c in conns if c.user in shut]

    async def _close_where(
        self, connz_filter: dict[str, Any], choose: Callable[[list[Connection]], Awaitable[list[Connection]]]
    ) -> tuple[int, float | None]:
        """Close the connections (of every node) that `choose` picks from those matching the filter.

        Each node's answer is acted on as it comes (the wait for other nodes costs nothing).
        Returns how many were closed, and the milliseconds until the last of them was.
        """
        started = time.monotonic()
        closed, done_ms = 0, None
        for page in range(_MAX_PAGES):
            kicks: list[asyncio.Task[float | None]] = []
            full = False
            async for conns, page_full in self._connz({**connz_filter, "offset": page * _PAGE, "limit": _PAGE}):
                full = full or page_full
                kicks += [asyncio.create_task(self._kick(c)) for c in await choose(conns)]
            finished = [at for at in await asyncio.gather(*kicks) if at is not None]
            if finished:
                closed += len(finished)
                done_ms = round((max(finished) - started) * 1000, 1)
            if not full:
                break
        return closed, done_ms

    async def _connz(self, options: dict[str, Any]) -> AsyncIterator[tuple[list[Connection], bool]]:
        """Each node's page of connections as it answers, within `gather_s`; True if that page was full."""
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        try:
            await self._nc.publish(subjects.SERVER_CONNZ, json.dumps(options).encode(), reply=inbox)
            deadline = time.monotonic() + self._gather_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except TimeoutError:
                    break
                answer = _json(msg.data)
                server, data = answer.get("server") or {}, answer.get("data") or {}
                server_id = server.get("id") if isinstance(server, dict) else None
                if not isinstance(server_id, str) or not isinstance(data, dict):
                    continue
                page = data.get("connections") or []
                conns = [
                    Connection(server_id, c["cid"], str(c.get("authorized_user") or options.get("user", "")))
                    for c in page
                    if isinstance(c, dict) and isinstance(c.get("cid"), int)
                ]
                yield conns, len(page) >= _PAGE
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _kick(self, conn: Connection) -> float | None:
        """Close one connection on its node; when it was closed (None: it was not, mostly gone already)."""
        try:
            kick = subjects.server_kick(conn.server_id)
            msg = await self._nc.request(kick, json.dumps({"cid": conn.cid}).encode(), 2.0)
        except Exception as exc:
            log.warning("provider_kick_failed", cid=conn.cid, error=type(exc).__name__)
            return None
        return None if _json(msg.data).get("error") else time.monotonic()


async def _every(conns: list[Connection]) -> list[Connection]:
    return conns


def _json(payload: str | bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
