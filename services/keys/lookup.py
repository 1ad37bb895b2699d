"""The hot-path key lookup: cache first, Postgres on a miss, revocations pushed in.

In the steady state an authenticated request costs a SHA-256 and a dict lookup,
no database round trip. The cache is trusted only while the revocation listener
is connected; otherwise every lookup goes to Postgres.
"""

from __future__ import annotations

import asyncpg

from services.keys import format as key_format
from services.keys.cache import KeyCache
from services.keys.last_used import LastUsed
from services.keys.revocations import RevocationListener
from services.keys.store import KeyRecord, find_active_digest
from services.settings import Settings


class KeyLookup:
    def __init__(self, db: asyncpg.Pool, settings: Settings) -> None:
        self._db = db
        self.cache = KeyCache(ttl_s=settings.key_cache_ttl_s, size=settings.key_cache_size)
        self.listener = RevocationListener(
            settings.database_url, on_change=self.cache.invalidate, on_reset=self.cache.clear
        )
        self.last_used = LastUsed(db, interval_s=settings.key_last_used_flush_s)

    async def start(self) -> None:
        await self.listener.start()
        await self.last_used.start()

    async def stop(self) -> None:
        await self.last_used.stop()
        await self.listener.stop()

    async def find(self, key: str) -> KeyRecord | None:
        """The active record of a well-formed key, or None if unknown or revoked."""
        digest = key_format.digest(key)
        record = self.cache.get(digest) if self.listener.healthy else None
        if record is None:
            epoch = self.cache.epoch
            record = await find_active_digest(self._db, digest)
            if record is None:
                return None
            if self.listener.healthy:
                self.cache.put(digest, record, epoch=epoch)
        self.last_used.touch(record.key_id)
        return record
