"""Quota leases: each replica serves a subject's requests from a slice of its quota held in memory.

A replica leases part of what a subject has left (requests, tokens, concurrency
slots) in one statement that checks `used + leased + grant <= limit` under the
subject's row lock, so the leases of all replicas together never exceed the
limit: overshoot stays zero. Requests are then admitted from memory. What they
use moves from the lease to quota_usage when their reservation rows are written
(one statement per batch, services/usage/batch.py), and their settlement gives
the slot back to the lease and unused tokens to the subject (also batched). The
lease's size follows the subject's rate on this replica, it is cut to a quarter
of what is left (so near the limit replicas lease one at a time, and no replica
sits on what another could use for long), and an idle one is given back. A
replica that dies stops touching its lease rows; any other one gives them back.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
from dataclasses import dataclass, field

import asyncpg

from schemas.usage_events import ENCODER, Closed, Opened, Whole
from services.usage.quotas import Holder, Limits, Usage, today

# Where a statement runs: the pool, or a connection holding a transaction.
Executor = asyncpg.Pool | asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

_ENSURE = "INSERT INTO quota_usage (subject, window_day) VALUES ($1, $2) ON CONFLICT (subject) DO NOTHING"

# The grant. `cur` locks the subject's row and reads it as of the lock; a grant is at least what
# the request at hand needs and at most a quarter of what is left (or what is wanted).
_GRANT = """
WITH lim AS (
    SELECT coalesce(q.requests_per_day, $4) AS r, coalesce(q.tokens_per_day, $5) AS t,
           coalesce(q.concurrent, $6) AS c
    FROM (SELECT 1) AS one LEFT JOIN account_quotas q ON q.account_id = $7
), cur AS (
    SELECT u.subject,
           lim.r - (CASE WHEN u.window_day = $2 THEN u.requests + u.leased_requests ELSE 0 END) AS left_r,
           lim.t - (CASE WHEN u.window_day = $2 THEN u.tokens + u.leased_tokens ELSE 0 END) AS left_t,
           lim.c - (u.inflight + u.leased_slots) AS left_c
    FROM quota_usage u, lim
    WHERE u.subject = $1
    FOR UPDATE OF u
), g AS (
    SELECT subject,
           greatest(1, least($8, left_r / 4))::int AS r,
           greatest($3, least($9, left_t / 4))::bigint AS t,
           greatest(1, least($10, left_c / 4))::int AS c
    FROM cur
    WHERE left_r >= 1 AND left_t >= $3 AND left_c >= 1
), took AS (
    UPDATE quota_usage u SET
        requests = CASE WHEN u.window_day = $2 THEN u.requests ELSE 0 END,
        tokens = CASE WHEN u.window_day = $2 THEN u.tokens ELSE 0 END,
        leased_requests = (CASE WHEN u.window_day = $2 THEN u.leased_requests ELSE 0 END) + g.r,
        leased_tokens = (CASE WHEN u.window_day = $2 THEN u.leased_tokens ELSE 0 END) + g.t,
        leased_slots = u.leased_slots + g.c,
        window_day = $2
    FROM g
    WHERE u.subject = g.subject
    RETURNING u.requests + u.leased_requests AS used_r, u.tokens + u.leased_tokens AS used_t,
              u.inflight + u.leased_slots AS used_c
), held AS (
    INSERT INTO quota_leases AS l (subject, gateway_id, window_day, requests, tokens, slots, stale_after_s)
    SELECT $1, $11, $2, g.r, g.t, g.c, $12 FROM g
    ON CONFLICT (subject, gateway_id) DO UPDATE SET
        requests = (CASE WHEN l.window_day = $2 THEN l.requests ELSE 0 END) + excluded.requests,
        tokens = (CASE WHEN l.window_day = $2 THEN l.tokens ELSE 0 END) + excluded.tokens,
        slots = l.slots + excluded.slots,
        window_day = $2,
        last_seen = now(),
        stale_after_s = $12
    RETURNING 1
)
SELECT lim.r AS lim_r, lim.t AS lim_t, lim.c AS lim_c,
       g.r AS grant_r, g.t AS grant_t, g.c AS grant_c,
       took.used_r, took.used_t, took.used_c,
       cur.left_r, cur.left_t, cur.left_c,
       (SELECT count(*) FROM held) AS held
FROM lim LEFT JOIN cur ON true LEFT JOIN g ON true LEFT JOIN took ON true
"""

# Requests admitted from a lease get their reservation rows: what they hold moves from the lease
# to quota_usage's counters. Only where this replica's lease still holds it (a lease given back
# by a sweeper while this replica could not reach Postgres admits nothing more).
_OPEN = """
WITH p AS (
    SELECT * FROM unnest($3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::text[], $8::text[], $9::bigint[])
        AS p(request_id, subject, account_id, key_id, demo_token_id, model, tokens)
), lk AS (
    -- Lock order, in every statement here: the subjects' quota_usage rows (by subject), then leases.
    SELECT subject FROM quota_usage WHERE subject IN (SELECT subject FROM p) ORDER BY subject FOR UPDATE
), agg AS (
    SELECT subject, count(*)::int AS n, sum(tokens)::bigint AS t
    FROM p WHERE subject IN (SELECT subject FROM lk) GROUP BY subject
), l AS (
    UPDATE quota_leases l SET requests = l.requests - agg.n, tokens = l.tokens - agg.t, slots = l.slots - agg.n,
                              last_seen = now()
    FROM agg
    WHERE l.subject = agg.subject AND l.gateway_id = $1 AND l.window_day = $2
      AND l.requests >= agg.n AND l.tokens >= agg.t AND l.slots >= agg.n
    RETURNING l.subject, agg.n, agg.t
), u AS (
    UPDATE quota_usage q SET
        requests = q.requests + CASE WHEN q.window_day = $2 THEN l.n ELSE 0 END,
        tokens = q.tokens + CASE WHEN q.window_day = $2 THEN l.t ELSE 0 END,
        inflight = q.inflight + l.n,
        leased_requests = CASE WHEN q.window_day = $2 THEN q.leased_requests - l.n ELSE q.leased_requests END,
        leased_tokens = CASE WHEN q.window_day = $2 THEN q.leased_tokens - l.t ELSE q.leased_tokens END,
        leased_slots = q.leased_slots - l.n
    FROM l
    WHERE q.subject = l.subject
    RETURNING 1
), ins AS (
    INSERT INTO reservations
        (request_id, subject, account_id, key_id, demo_token_id, model, window_day, tokens_reserved, gateway_id)
    SELECT p.request_id, p.subject, p.account_id, p.key_id, p.demo_token_id, p.model, $2, p.tokens, $1
    FROM p JOIN l ON l.subject = p.subject
    RETURNING request_id
)
SELECT request_id, (SELECT count(*) FROM u) AS subjects FROM ins
"""

# A batch of one replica's usage events from the usage stream (services/usage/ledger.py), its
# reservations then its settlements, in one call of a function (migration 0016, where the statements are
# and what they do): one round trip, atomic on its own. The events go as JSON (migration 0017: asyncpg's
# typed arrays cost the gateway more than the rest of its consumer). Settlement without the stream calls
# it with no reservations.
_APPLY = """
SELECT request_id, to_lease, subjects, written FROM usage_apply_json($1, $2, $3, $4)
"""
# And a batch's whole answers (migration 0018): straight to the ledger, without a reservations row.
_APPLY_WITH_WHOLES = """
SELECT request_id, to_lease, subjects, written FROM usage_apply_json($1, $2, $3, $4, $5)
"""

# Part of a lease given back by the replica holding it. No clamping at 0 here or below: with the usage
# stream, a lease row (and the subject's leased counters with it) can be short for a moment, while a
# slot given back from memory still waits in the stream as a settlement. Each change is a sum that the
# events then complete; clamping one would lose it for good (the counters would drift apart).
_GIVE_BACK = """
WITH lk AS (
    SELECT subject FROM quota_usage WHERE subject = $1 FOR UPDATE
), l AS (
    UPDATE quota_leases SET requests = requests - $3, tokens = tokens - $4, slots = slots - $5
    WHERE subject = $1 AND gateway_id = $2 AND requests >= $3 AND tokens >= $4 AND slots >= $5
      AND EXISTS (SELECT 1 FROM lk)
    RETURNING window_day
)
UPDATE quota_usage u SET
    leased_requests = CASE WHEN u.window_day = l.window_day THEN u.leased_requests - $3
                           ELSE u.leased_requests END,
    leased_tokens = CASE WHEN u.window_day = l.window_day THEN u.leased_tokens - $4
                         ELSE u.leased_tokens END,
    leased_slots = u.leased_slots - $5
FROM l
WHERE u.subject = $1
RETURNING 1
"""

# Leases of replicas that stopped touching them (died): given back to their subjects.
_STALE = """
WITH lk AS (
    SELECT subject FROM quota_usage
    WHERE subject IN (
        SELECT subject FROM quota_leases WHERE last_seen < now() - make_interval(secs => stale_after_s)
    )
    ORDER BY subject FOR UPDATE
), gone AS (
    DELETE FROM quota_leases
    WHERE last_seen < now() - make_interval(secs => stale_after_s) AND subject IN (SELECT subject FROM lk)
    RETURNING *
), agg AS (
    SELECT g.subject,
           sum(CASE WHEN g.window_day = q.window_day THEN g.requests ELSE 0 END)::int AS r,
           sum(CASE WHEN g.window_day = q.window_day THEN g.tokens ELSE 0 END)::bigint AS t,
           sum(g.slots)::int AS c
    FROM gone g JOIN quota_usage q ON q.subject = g.subject
    GROUP BY g.subject
)
UPDATE quota_usage u SET
    leased_requests = u.leased_requests - agg.r,
    leased_tokens = u.leased_tokens - agg.t,
    leased_slots = u.leased_slots - agg.c
FROM agg
WHERE u.subject = agg.subject
RETURNING u.subject
"""

# Rows a statement of this replica holds right now are skipped (that statement refreshes them itself);
# the answer lists every row this replica still has. A row is refreshed only once it is older than $2
# seconds (a quarter of its stale time; the ledger's batches refresh a busy lease's row anyway): idle
# leases standing by for their subjects' next requests are one row update every few ticks each, not one
# per tick, and none comes near its stale time.
_TOUCH = """
WITH t AS (
    UPDATE quota_leases SET last_seen = now()
    WHERE (subject, gateway_id) IN (
        SELECT subject, gateway_id FROM quota_leases
        WHERE gateway_id = $1 AND last_seen < now() - make_interval(secs => $2)
        FOR UPDATE SKIP LOCKED
    )
    RETURNING 1
)
SELECT subject, (SELECT count(*) FROM t) AS touched FROM quota_leases WHERE gateway_id = $1
"""
_FORGET_EMPTY = """
DELETE FROM quota_leases WHERE (subject, gateway_id) IN (
    SELECT subject, gateway_id FROM quota_leases
    WHERE gateway_id = $1 AND subject = ANY($2::text[]) AND requests = 0 AND tokens = 0 AND slots = 0
    FOR UPDATE SKIP LOCKED
)
"""

# How many seconds of this replica's rate of a subject one lease should cover.
HORIZON_S = 2.0
# How many subjects' last leases a replica remembers the use of (`Lease.remembered`), the oldest forgotten first,
# and the most a first grant asks for that way (a bigger burst goes on doubling from there): a subject back for
# one request holds no more than this of its quota idle until the next tick gives it back.
REMEMBERED_SUBJECTS = 10_000
REMEMBERED_MAX = 256
# What doubling a quickly used-up lease may ask for at most (`wanted`).
MAX_DOUBLED = 4096
# A settled request's slot stays in this replica's lease while more than this many of the subject's
# requests run here (it will be needed again at once); otherwise it goes back to the subject.
KEEP_SLOTS_ABOVE = 4
# And one spare slot stays while the subject had at least this many slots free at the last grant: a
# replica serving one request after another then leases once, not once per request (an idle lease,
# spare slot included, goes back as any other). A subject near its concurrency limit gets every slot back.
# More than one stays, up to the most of the subject's requests that ran here at once lately (`Lease.peak`),
# while the subject had this many times the slots kept free: a load whose requests here rise and fall
# (a closed loop of 16 whose client is busy half the time) otherwise gave its slots back at each fall and
# leased them again at each rise, one statement per dozen requests (`just bench hotpath`, 2026-12-07).
SPARE_SLOT_IF_FREE = 4


@dataclass
class Lease:
    """What this replica holds of one subject's quota, unused (in memory; its row is the durable copy)."""

    subject: str
    day: dt.date
    limits: Limits
    requests: int = 0
    tokens: int = 0
    slots: int = 0
    # Slots of this subject's requests running here, and the most at once since the last maintenance tick.
    in_use: int = 0
    peak: int = 0
    # The subject's counters (used + leased by all replicas) after this replica's last grant, and
    # what this lease held then: the rate-limit headers' figures without a query.
    total_r: int = 0
    total_t: int = 0
    total_c: int = 0
    # Admitted since the last maintenance tick, and the smoothed rate (requests/s).
    admitted: int = 0
    rate: float = 0.0
    # Until its first grant: the last busy spell of this subject's lease before it (a subject that works in
    # bursts with idle gaps longer than a lease stands by, whose lease is given back in between).
    remembered: int = 0
    # Who the subject is and the tokens its last request held, the requests admitted since it was last idle
    # and in the busy spell before: what an idle lease standing by is refilled for.
    holder: Holder | None = None
    last_tokens: int = 0
    spell: int = 0
    last_spell: int = 0
    # The requests of the last grant, and when it came (`wanted`: a lease used up quickly grows).
    granted_r: int = 0
    granted_at: float = -math.inf
    used_at: float = field(default_factory=time.monotonic)
    # When Postgres last confirmed the row (a grant or a touch): a lease not confirmed for half the
    # stale time may have been given back by another replica, so nothing is admitted from it.
    confirmed_at: float = field(default_factory=time.monotonic)
    waiters: int = 0
    granting: asyncio.Future[None] | None = None
    # When this replica last settled one of the subject's requests (what a refusal may be waiting for),
    # and the wait for the usage stream's consumer under way for it, if any (one per subject at a time).
    settled_at: float = 0.0
    catching_up: asyncio.Task[bool] | None = None

    def usage(self) -> Usage:
        return Usage(
            self.limits,
            max(0, self.total_r - self.requests),
            max(0, self.total_t - self.tokens),
            max(0, self.total_c - self.slots),
            self.day,
        )

    def settled(self, tokens_given_back: int, refund: bool) -> None:
        """A request settled: what it gives back to the subject no longer counts as used in the headers."""
        self.total_t = max(0, self.total_t - tokens_given_back)
        if refund:
            self.total_r = max(0, self.total_r - 1)
        self.settled_at = time.monotonic()

    def covers(self, tokens: int) -> bool:
        return self.requests >= 1 and self.tokens >= tokens and self.slots >= 1

    def spare_slots(self) -> int:
        """Slots to give back at a maintenance tick, which another replica could use for this subject: beyond
        2, or as many as are in use, or (where the subject has room, as `keeps_slot` says) what the most of its
        requests running here at once since the last tick needed."""
        spare = max(2, self.in_use)
        if self.limits.concurrent - self.total_c >= SPARE_SLOT_IF_FREE * self.peak:
            spare = max(spare, self.peak - self.in_use)
        return max(0, self.slots - spare)

    def standby(self) -> tuple[int, int, int]:
        """What an idle lease waiting for its subject's next requests holds at least: as many requests as its
        last busy spell served (up to REMEMBERED_MAX), each like its last, and a slot."""
        r = max(1, min(self.last_spell, REMEMBERED_MAX))
        return r, r * self.last_tokens, 1

    def ready(self) -> bool:
        """Whether an idle lease holds its standby share already (nothing to refill)."""
        r, t, c = self.standby()
        return self.requests >= r and self.tokens >= t and self.slots >= c

    def stands_by(self) -> bool:
        """Whether this lease, idle, may wait for its subject's next request: the subject had, at the last
        grant, SPARE_SLOT_IF_FREE times free of each of requests, tokens and slots what the lease holds (or
        its standby share, if more): holding it idle then keeps no other replica's request out."""
        limits, k = self.limits, SPARE_SLOT_IF_FREE
        r, t, c = self.standby()
        return (
            self.holder is not None
            and limits.requests_per_day - self.total_r >= k * max(r, self.requests)
            and limits.tokens_per_day - self.total_t >= k * max(t, self.tokens)
            and limits.concurrent - self.total_c >= k * max(c, self.slots)
        )

    def keeps_slot(self) -> bool:
        """Whether the slot of a request settling now stays in this lease rather than going to the subject."""
        if self.in_use > KEEP_SLOTS_ABOVE:
            return True
        room = self.limits.concurrent - self.total_c
        if self.slots == 0:
            return room >= SPARE_SLOT_IF_FREE
        # What this lease holds if the slot stays (the settling request is still in `in_use`).
        held = self.slots + self.in_use
        return held <= self.peak and room >= SPARE_SLOT_IF_FREE * held


@dataclass(frozen=True, slots=True)
class Refused:
    usage: Usage


async def grant(
    db: asyncpg.Pool,
    lease: Lease,
    holder: Holder,
    limits: Limits,
    *,
    need_t: int,
    want: tuple[int, int, int],
    gw: str,
    stale_after_s: float,
) -> Refused | None:
    """Add to `lease` in one statement; Refused (with the subject's usage) when not even one request fits."""
    day = today()
    args = (
        holder.subject,
        day,
        need_t,
        limits.requests_per_day,
        limits.tokens_per_day,
        limits.concurrent,
        holder.account_id,
        *want,
        gw,
        stale_after_s,
    )
    async with db.acquire() as conn:
        row = await conn.fetchrow(_GRANT, *args)
        assert row is not None
        if row["left_r"] is None:
            # The subject's first request: its row does not exist yet.
            await conn.execute(_ENSURE, holder.subject, day)
            row = await conn.fetchrow(_GRANT, *args)
            assert row is not None
    effective = Limits(row["lim_r"], row["lim_t"], row["lim_c"])
    if row["grant_r"] is None or row["held"] != 1:
        if row["left_r"] is None:
            return Refused(Usage(effective, 0, 0, 0, day))
        return Refused(
            Usage(
                effective,
                effective.requests_per_day - row["left_r"],
                effective.tokens_per_day - row["left_t"],
                effective.concurrent - row["left_c"],
                day,
            )
        )
    if lease.day != day:
        lease.day, lease.requests, lease.tokens = day, 0, 0
    lease.limits = effective
    lease.requests += row["grant_r"]
    lease.tokens += row["grant_t"]
    lease.slots += row["grant_c"]
    lease.total_r, lease.total_t, lease.total_c = row["used_r"], row["used_t"], row["used_c"]
    lease.confirmed_at = lease.granted_at = time.monotonic()
    lease.granted_r = row["grant_r"]
    lease.remembered = 0
    return None


def _open_args(gw: str, day: dt.date | None, group: list[Opened]) -> tuple[object, ...]:
    return (
        gw,
        day,
        [i.request_id for i in group],
        [i.subject for i in group],
        [i.account_id for i in group],
        [i.key_id for i in group],
        [i.demo_token_id for i in group],
        [i.model for i in group],
        [i.tokens for i in group],
    )


def by_day(items: list[Opened]) -> dict[dt.date, list[Opened]]:
    groups: dict[dt.date, list[Opened]] = {}
    for item in items:
        groups.setdefault(item.day, []).append(item)
    return groups


async def open_many(db: asyncpg.Pool, gw: str, items: list[Opened]) -> list[bool]:
    """Reservation rows for requests admitted from leases; False where the lease no longer held them."""
    written: set[str] = set()
    for day, group in by_day(items).items():
        rows = await db.fetch(_OPEN, *_open_args(gw, day, group))
        written.update(r["request_id"] for r in rows)
    return [i.request_id in written for i in items]


async def apply_many(
    db: Executor,
    gw: str,
    day: dt.date | None,
    opens: list[Opened],
    closes: list[Closed],
    wholes: list[Whole] | None = None,
) -> list[tuple[bool, bool]]:
    """Write whole answers and reservations of `day` (from the usage stream: never refused), then settle
    `closes`; per settlement (settled now, its slot went back to this replica's lease)."""
    args = (gw, day, ENCODER.encode(opens).decode(), ENCODER.encode(closes).decode())
    if wholes:
        rows = await db.fetch(_APPLY_WITH_WHOLES, *args, ENCODER.encode(wholes).decode())
    else:
        rows = await db.fetch(_APPLY, *args)
    done = {r["request_id"]: bool(r["to_lease"]) for r in rows}
    return [(i.request_id in done, done.get(i.request_id, False)) for i in closes]


async def close_many(db: Executor, gw: str, items: list[Closed]) -> list[tuple[bool, bool]]:
    """Settle a batch; per item (settled now, its slot went back to this replica's lease)."""
    return await apply_many(db, gw, None, [], items)


async def give_back(db: asyncpg.Pool, gw: str, lease: Lease, r: int, t: int, c: int) -> bool:
    """Return part of a lease; True when Postgres took it (the caller then drops it from memory)."""
    if not (r or t or c):
        return True
    row = await db.fetchrow(_GIVE_BACK, lease.subject, gw, r, t, c)
    return row is not None


async def touch(db: asyncpg.Pool, gw: str, older_than_s: float) -> set[str]:
    """Keep this replica's lease rows alive (those not refreshed for `older_than_s`); the subjects whose rows
    still exist."""
    return {r["subject"] for r in await db.fetch(_TOUCH, gw, older_than_s)}


async def forget_empty(db: asyncpg.Pool, gw: str, subjects: list[str]) -> None:
    if subjects:
        await db.execute(_FORGET_EMPTY, gw, subjects)


async def give_back_stale(db: asyncpg.Pool) -> int:
    """Give back the leases whose holders stopped touching them for longer than they said they might."""
    return len(await db.fetch(_STALE))


def wanted(lease: Lease, tokens: int) -> tuple[int, int, int]:
    """How much to ask for: enough to hold this replica's rate over HORIZON_S, at least what is waiting now.

    The rate is smoothed once per maintenance tick, so a burst on a subject that was quiet would lease
    one request (or one per waiter) at a time until the next tick: one statement per few requests. A
    lease used up within HORIZON_S of its grant asks for twice that grant instead (a grant is still
    at most a quarter of what the subject has left, so near its limit this changes nothing).

    Requests are topped up to that, not added: a lease short of slots alone asks for little else (its
    grants had doubled the requests each time, and a replica held hundreds of thousands it never used).
    Slots: half those in use, and back up to the recent peak.

    A new lease of a subject whose lease was given back idle lately asks at once for what that one used: a
    subject working in bursts (an agent's dozen calls, then a pause) took a grant per doubling, 1, 2, 4, ...,
    in every burst (`just bench hotpath`: 0.45 statements per request with one key per worker at c=64).
    """
    r = max(1, lease.waiters, math.ceil(lease.rate * HORIZON_S), lease.remembered)
    used_up = lease.requests < 1 or lease.tokens < tokens
    if used_up and time.monotonic() - lease.granted_at < HORIZON_S:
        r = max(r, min(MAX_DOUBLED, 2 * lease.granted_r))
    c = max(1, lease.waiters, lease.in_use // 2, lease.peak - lease.in_use - lease.slots)
    return max(1, r - lease.requests), max(tokens, r * tokens - lease.tokens), c
