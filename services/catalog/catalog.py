"""This replica's copy of the model catalog, and the verdict it gives each model a provider reports.

The catalog is small and read on every heartbeat, so each replica holds all of it in
memory (services/catalog/store.py), kept current by the table's NOTIFY: an entry an
operator allows or revokes changes routing on every replica at once. It is also re-read
whenever the listener (re)connects, when a notice may have been missed, and every
`reload_every_s` as a safety net.

Verdicts (bus.ModelVerdict), for a model id and the identity a provider reports for it:
- `verified`: the identity is listed for the id: routed;
- `hash_mismatch`: the id is listed with other identities, or with none any more (all revoked):
  not routed;
- `hash_pending`: the id is listed but the provider reports no identity yet (still hashing): not routed;
- an id with no entry at all: `not_in_catalog` (not routed) when `uncatalogued` is "refuse",
  the production default; `uncatalogued` (routed, unverified) when it is "allow" (a pool
  that serves whatever its providers bring, such as a developer's laptop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

import asyncpg
import structlog

from schemas import bus
from schemas.tasks import cancel_and_wait
from services.catalog import store
from services.db.notify import NotifyListener

log = structlog.get_logger("gateway.catalog")

UNCATALOGUED_CHOICES = ("refuse", "allow")
# While the listener is down, the catalog is re-read at least this often.
_UNHEALTHY_RELOAD_S = 5.0

ChangeCallback = Callable[[], None]


class Catalog:
    def __init__(
        self,
        db: asyncpg.Pool | None,
        dsn: str,
        *,
        uncatalogued: str = "refuse",
        reload_every_s: float = 30.0,
    ) -> None:
        if uncatalogued not in UNCATALOGUED_CHOICES:
            raise ValueError(f"uncatalogued must be one of {UNCATALOGUED_CHOICES}, got {uncatalogued!r}")
        self._db = db
        self.uncatalogued = uncatalogued
        self._reload_every_s = reload_every_s
        self._entries: dict[str, frozenset[str]] = {}
        self._callbacks: list[ChangeCallback] = []
        self._reload_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener = NotifyListener(
            dsn,
            store.CHANNEL,
            on_notice=self._notified,
            on_reset=self._reload_now.set,
            application_name="mp-model-catalog",
        )

    def on_change(self, callback: ChangeCallback) -> None:
        """Call `callback()` whenever an entry is allowed or revoked (here: routing must be re-decided)."""
        self._callbacks.append(callback)

    async def start(self) -> None:
        # Read before any heartbeat is judged: an empty catalog would refuse every model.
        await self.reload()
        await self._listener.start()
        self._task = asyncio.create_task(self._loop(), name="model-catalog")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self._listener.stop()

    # ---- reading it: no I/O ---------------------------------------------------------------------

    def hashes(self, model_id: str) -> frozenset[str]:
        return self._entries.get(model_id, frozenset())

    def listed(self, model_id: str, sha256: str) -> bool:
        return bool(sha256) and sha256 in self.hashes(model_id)

    def verdict(self, model: bus.ModelInfo) -> bus.ModelVerdict:
        """How this pool treats `model` as a provider reports it."""
        sha = model.weights_sha256
        hashes = self._entries.get(model.id)
        if hashes is None:
            if self.uncatalogued == "allow":
                return bus.ModelVerdict(
                    model.id,
                    "uncatalogued",
                    True,
                    sha,
                    "no catalog entry for this model id: served unverified (MP_UNCATALOGUED_MODELS=allow)",
                )
            return bus.ModelVerdict(
                model.id, "not_in_catalog", False, sha, f"model id {model.id!r} is not in this pool's catalog"
            )
        if sha in hashes:
            return bus.ModelVerdict(model.id, "verified", True, sha)
        if not hashes:
            return bus.ModelVerdict(
                model.id, "hash_mismatch", False, sha, f"no weights are listed for {model.id!r} any more (revoked)"
            )
        if not sha:
            return bus.ModelVerdict(
                model.id, "hash_pending", False, sha, "no weights hash reported yet (still hashing?)"
            )
        return bus.ModelVerdict(
            model.id,
            "hash_mismatch",
            False,
            sha,
            f"weights {sha[:12]}… are not listed for {model.id!r} "
            f"(the catalog lists {len(hashes)} other weights hash{'es' if len(hashes) != 1 else ''})",
        )

    # ---- keeping it current ---------------------------------------------------------------------

    async def reload(self) -> None:
        if self._db is None:
            return
        entries = await store.active(self._db)
        if entries != self._entries:
            self._entries = entries
            self._changed()

    def _notified(self, payload: str) -> None:
        try:
            notice = json.loads(payload)
            model_id, sha, active = str(notice["model_id"]), str(notice["weights_sha256"]), bool(notice["active"])
            deleted = bool(notice.get("deleted"))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("catalog_notice_unreadable")
            self._reload_now.set()
            return
        # Revoked stays catalogued (store.active says why); a row deleted by hand may have been the
        # id's last, which only a full read can tell: until it comes, the id stays catalogued.
        hashes = set(self._entries.get(model_id, ()))
        if active:
            hashes.add(sha)
        else:
            hashes.discard(sha)
        self._entries[model_id] = frozenset(hashes)
        if deleted:
            self._reload_now.set()
        log.info("catalog_changed", model=model_id, weights_sha256=sha, active=active)
        self._changed()

    def _changed(self) -> None:
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                log.exception("catalog_callback_failed")

    async def _loop(self) -> None:
        while True:
            every = self._reload_every_s if self._listener.healthy else min(self._reload_every_s, _UNHEALTHY_RELOAD_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self._reload_now.wait()
            self._reload_now.clear()
            try:
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("catalog_reload_failed", error=type(exc).__name__)
                await asyncio.sleep(1.0)
