"""A small in-process cache of key lookups: SHA-256 digest → active key record.

Entries are trusted at most `ttl_s` (the safety net should an invalidation ever be
lost) and the oldest go first beyond `size`. An entry past its time is not trusted
but still `known`: refreshing a key Postgres vouched for is no guess
(services/keys/lookup.py). `epoch` closes the race between a lookup and a
revocation: a lookup remembers the epoch before it reads Postgres and may
store its answer only if no invalidation happened meanwhile, so a row read just
before a revocation cannot outlive the revocation's notice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from services.keys.store import KeyRecord


class KeyCache:
    def __init__(self, *, ttl_s: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._size = max(1, size)
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[KeyRecord, float]] = OrderedDict()
        self._digest_of: dict[int, bytes] = {}
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes) -> KeyRecord | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        record, stored_at = entry
        if self._clock() - stored_at > self._ttl_s:
            return None  # stale: kept, `known`, until refreshed, dropped or pushed out
        self._entries.move_to_end(digest)
        return record

    def known(self, digest: bytes) -> bool:
        """Whether Postgres vouched for this key (trusted still or not): not revoked since, as far as we heard."""
        return digest in self._entries

    def forget(self, digest: bytes) -> None:
        """A lookup found the key no longer active."""
        self._drop(digest)

    def put(self, digest: bytes, record: KeyRecord, *, epoch: int) -> bool:
        """Store a lookup that started at `epoch`; refused if anything was invalidated since."""
        if epoch != self.epoch:
            return False
        self._entries[digest] = (record, self._clock())
        self._entries.move_to_end(digest)
        self._digest_of[record.key_id] = digest
        while len(self._entries) > self._size:
            oldest = next(iter(self._entries))
            self._drop(oldest)
        return True

    def invalidate(self, key_id: int) -> None:
        self.epoch += 1
        digest = self._digest_of.get(key_id)
        if digest is not None:
            self._drop(digest)

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()
        self._digest_of.clear()

    def _drop(self, digest: bytes) -> None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self._digest_of.pop(entry[0].key_id, None)
