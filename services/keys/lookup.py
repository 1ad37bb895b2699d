"""The hot-path key lookup: cache first, Postgres on a miss, revocations pushed in.

In the steady state an authenticated request costs a SHA-256 and a dict lookup,
no database round trip. The cache is trusted only while the revocation listener
is connected; otherwise every lookup goes to Postgres.

A lookup that reaches Postgres and finds nothing (a well-formed key, right
checksum, unknown or revoked) costs a query and answers nothing: each client may
have `MP_FAILED_AUTH_PER_MIN` of those (rate_limit.TokenBuckets, per replica). The
budget is taken before the query and given back when the key is found, so a flood
of concurrent guesses cannot overshoot it and a client using a real key never
spends any; a client over budget is refused (429) for keys this replica has not
cached, without a query. Concurrent misses of one key wait for one query, so many
requests arriving together with a valid key never count as many failed ones. A key
whose cache entry only expired (`KeyCache.known`) is refreshed without the budget:
an agent fleet's 64 keys, cached together, expired together, and their refreshes
once took 64 units at once from one address (26 refused 429 in `just bench hotpath`).

A client whose budget is all held by its own lookups still under way waits for
them rather than being refused: each that finds its key gives its unit back.
Many keys this replica has never seen (a replica just started, a company's
agents behind one address) arriving together were refused 429 past the budget
(21 of 64 in `just bench hotpath`), although none was a guess. Guesses stay
bounded: at most the budget's worth of one client's queries run at once, and
once they have failed, the rest are refused without one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import asyncpg

from services.auth.rate_limit import TokenBuckets
from services.errors import RateLimited
from services.keys import format as key_format
from services.keys.cache import KeyCache
from services.keys.last_used import LastUsed
from services.keys.revocations import RevocationListener
from services.keys.store import KeyRecord, find_active_digest
from services.settings import Settings


class _Charged:
    """A client's lookups under way that each hold a unit of its budget, and the requests waiting for one.

    A finished lookup wakes one waiter if it gave its unit back; the last wakes them all: a flood of
    guesses waiting here costs a wake-up each, not one per waiter per finished lookup.
    """

    __slots__ = ("lookups", "waiters")

    def __init__(self) -> None:
        self.lookups = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def turn(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        await waiter

    def wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():  # (a waiter whose buyer left is cancelled)
                waiter.set_result(None)
                return

    def wake_all(self) -> None:
        while self.waiters:
            self.wake_one()


class KeyLookup:
    def __init__(self, db: asyncpg.Pool, settings: Settings) -> None:
        self._db = db
        self.cache = KeyCache(ttl_s=settings.key_cache_ttl_s, size=settings.key_cache_size)
        self.listener = RevocationListener(
            settings.database_url, on_change=self.cache.invalidate, on_reset=self.cache.clear
        )
        self.last_used = LastUsed(db, interval_s=settings.key_last_used_flush_s)
        # Lookups under way, by key digest (`find`).
        self._lookups: dict[bytes, asyncio.Future[KeyRecord | None]] = {}
        # The clients with lookups under way that hold a unit of their budget.
        self._charged: dict[str, _Charged] = {}
        self.failed_lookups = TokenBuckets(
            per_minute=settings.failed_auth_per_min, max_clients=settings.rate_limit_clients
        )

    async def start(self) -> None:
        await self.listener.start()
        await self.last_used.start()

    async def stop(self) -> None:
        await self.last_used.stop()
        await self.listener.stop()

    def cached(self, key: str) -> KeyRecord | None:
        """The record of a key this replica has cached (and may trust), or None: then `find` it."""
        if not self.listener.healthy:
            return None
        record = self.cache.get(key_format.digest(key))
        if record is not None:
            self.last_used.touch(record.key_id)
        return record

    async def find(self, key: str, *, client: Callable[[], str]) -> KeyRecord | None:
        """The active record of a well-formed key `cached` did not have, or None if unknown or revoked.

        `client()` (client_ip.client_key) is who a lookup that finds nothing is counted against: only
        asked on a cache miss. Concurrent misses of one key share one query and one unit of the budget:
        an agent fleet's 64 requests arriving together with a key this replica has not cached (new,
        or its entry just expired) once took 64 units, and all past the budget were refused 429.
        """
        digest = key_format.digest(key)
        pending = self._lookups.get(digest)
        who = None if pending is not None or self.cache.known(digest) else client()
        while pending is None:
            wait = self.failed_lookups.take(who) if who is not None else None
            if wait is None:
                pending = self._start(digest, who)
                break
            charged = self._charged.get(who) if who is not None else None
            if charged is None:
                raise RateLimited(
                    f"Too many requests with unknown API keys from this address; try again in {wait} s.",
                    headers={"retry-after": str(wait)},
                )
            # The budget is held by this client's lookups under way: a found key gives its unit back.
            await charged.turn()
            # Meanwhile another request may have looked this key up, or started to.
            if (record := self.cached(key)) is not None:
                return record
            pending = self._lookups.get(digest)
        # Shielded: one waiter's hang-up must not cancel the query the others wait for.
        record = await asyncio.shield(pending)
        if record is not None:
            self.last_used.touch(record.key_id)
        return record

    def _start(self, digest: bytes, who: str | None) -> asyncio.Future[KeyRecord | None]:
        """The lookup of `digest`, charged to `who` (None: to nobody)."""
        pending = self._lookups[digest] = asyncio.ensure_future(self._query(digest, who))
        pending.add_done_callback(lambda done: self._done(digest, done))
        if who is not None:
            charged = self._charged.get(who)
            if charged is None:
                charged = self._charged[who] = _Charged()
            charged.lookups += 1
            pending.add_done_callback(lambda done: self._uncharge(who, done))
        return pending

    def _uncharge(self, who: str, done: asyncio.Future[KeyRecord | None]) -> None:
        charged = self._charged[who]
        charged.lookups -= 1
        if charged.lookups == 0:
            # Nothing holds the budget any more: every waiter tries again (and is refused if it is spent).
            del self._charged[who]
            charged.wake_all()
        elif done.cancelled() or done.exception() is not None or done.result() is not None:
            # Its unit was given back (a key found, or the database failed): the next waiter may take it.
            charged.wake_one()

    async def _query(self, digest: bytes, who: str | None) -> KeyRecord | None:
        """`who`: the client charged for this lookup (None: a known key's refresh, charged to nobody)."""
        epoch = self.cache.epoch
        try:
            record = await find_active_digest(self._db, digest)
        except BaseException:
            if who is not None:
                self.failed_lookups.give_back(who)  # the database failed, not the key
            raise
        if record is None:
            # Revoked, and its notice missed: no longer known (its next lookup is a guess again).
            self.cache.forget(digest)
            return None
        if who is not None:
            self.failed_lookups.give_back(who)
        if self.listener.healthy:
            self.cache.put(digest, record, epoch=epoch)
        return record

    def _done(self, digest: bytes, done: asyncio.Future[KeyRecord | None]) -> None:
        if self._lookups.get(digest) is done:
            del self._lookups[digest]
        if not done.cancelled():
            done.exception()  # read: every waiter may have hung up
