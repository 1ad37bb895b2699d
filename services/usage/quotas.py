"""Quota state in Postgres: settlement, progress, stale reservations, a subject's snapshot.

Requests are admitted from quota leases (services/usage/leases.py), which also
write their reservations and settle them in batches. The single statements here
settle one reservation at a time (a retried settlement, a dead replica's
reservation swept by another): the reservation row becomes the ledger row keyed
by request id, and a second settlement of the same request finds no reservation
and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import time

import asyncpg
import msgspec

from schemas.usage_events import Settlement

UTC = dt.UTC


# Structs, not frozen dataclasses: made per request (a frozen dataclass sets each field through
# object.__setattr__; a Struct is built in C).
class Limits(msgspec.Struct, frozen=True, gc=False):
    requests_per_day: int
    tokens_per_day: int
    concurrent: int


class Usage(msgspec.Struct, frozen=True, gc=False):
    """A subject's counters in the current window, as of one statement."""

    limits: Limits
    requests: int
    tokens: int
    inflight: int
    window_day: dt.date

    @property
    def resets_at(self) -> dt.datetime:
        return dt.datetime.combine(self.window_day + dt.timedelta(days=1), dt.time(), tzinfo=UTC)

    def seconds_to_reset(self, now: dt.datetime | None = None) -> int:
        # In epoch seconds: every answer's x-ratelimit headers say it, and building the datetimes took
        # longer than the rest of those headers.
        resets = (self.window_day.toordinal() - _EPOCH_ORDINAL + 1) * 86400
        return max(1, int(resets - (time.time() if now is None else now.timestamp())) + 1)

    @property
    def requests_left(self) -> int:
        return max(0, self.limits.requests_per_day - self.requests)

    @property
    def tokens_left(self) -> int:
        return max(0, self.limits.tokens_per_day - self.tokens)


_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


class Holder(msgspec.Struct, frozen=True, gc=False):
    """Who a request is billed to."""

    subject: str
    account_id: int | None
    key_id: int | None
    demo_token_id: str | None


def today() -> dt.date:
    return dt.datetime.now(UTC).date()


# Settlement. `refund` gives the request back to the day's count (nothing ran).
_SETTLE = """
WITH lk AS (
    -- The subject's quota row first, as every statement that also writes leases or reservations does.
    SELECT subject FROM quota_usage
    WHERE subject = (SELECT subject FROM reservations WHERE request_id = $1)
    FOR UPDATE
), r AS (
    DELETE FROM reservations WHERE request_id = $1 AND subject IN (SELECT subject FROM lk) RETURNING *
), led AS (
    INSERT INTO usage_ledger
        (request_id, subject, account_id, key_id, demo_token_id, model, provider_id, prompt_tokens,
         completion_tokens, cached_tokens, ttft_ms, duration_ms, outcome, billed)
    SELECT r.request_id, r.subject, r.account_id, r.key_id, r.demo_token_id, r.model,
           coalesce($2, r.provider_id), $3, $4, $5, $6, $7, $8, NOT $9
    FROM r
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id
), upd AS (
    UPDATE quota_usage u SET
        inflight = u.inflight - 1,
        tokens = CASE WHEN u.window_day = r.window_day
                      THEN greatest(0, u.tokens - r.tokens_reserved + CASE WHEN $9 THEN 0 ELSE $3 + $4 END)
                      ELSE u.tokens END,
        requests = CASE WHEN $9 AND u.window_day = r.window_day THEN u.requests - 1 ELSE u.requests END
    FROM r
    WHERE u.subject = r.subject
    RETURNING u.window_day, u.requests, u.tokens, u.inflight
)
SELECT (SELECT count(*) FROM led) AS written, upd.* FROM upd
"""

# Reservations of a dead gateway: settled with the progress it last reported.
_STALE = """
SELECT request_id, provider_id, prompt_tokens, completion_tokens
FROM reservations WHERE last_seen < now() - $1::interval AND NOT (gateway_id = ANY($2::text[]))
"""

_TOUCH = """
UPDATE reservations r SET last_seen = now(), provider_id = coalesce(p.provider_id, r.provider_id),
       prompt_tokens = p.prompt_tokens, completion_tokens = p.completion_tokens
FROM unnest($1::text[], $2::text[], $3::int[], $4::int[])
     AS p(request_id, provider_id, prompt_tokens, completion_tokens)
WHERE r.request_id = p.request_id
  -- One being settled right now is skipped (never a lock wait, nor a deadlock with a batch settling several).
  AND r.request_id IN (SELECT request_id FROM reservations WHERE request_id = ANY($1) FOR UPDATE SKIP LOCKED)
"""


def _usage_from(limits: Limits, row: asyncpg.Record | None, day: dt.date) -> Usage:
    if row is None or row["window_day"] != day:
        return Usage(limits, 0, 0, row["inflight"] if row else 0, day)
    return Usage(limits, row["requests"], row["tokens"], row["inflight"], day)


async def settle(db: asyncpg.Pool | asyncpg.Connection, request_id: str, s: Settlement) -> bool:
    """Close a reservation into the ledger; False if it was already settled."""
    row = await db.fetchrow(
        _SETTLE,
        request_id,
        s.provider_id,
        s.prompt_tokens,
        s.completion_tokens,
        s.cached_tokens,
        s.ttft_ms,
        s.duration_ms,
        s.outcome,
        s.refund,
    )
    return row is not None and row["written"] == 1


async def touch(db: asyncpg.Pool, progress: list[tuple[str, str | None, int, int]]) -> None:
    if progress:
        ids, providers, prompts, completions = (list(col) for col in zip(*progress, strict=True))
        await db.execute(_TOUCH, ids, providers, prompts, completions)


async def settle_stale(db: asyncpg.Pool, stale_after_s: float, *, exclude_gateways: list[str] | None = None) -> int:
    """Settle reservations whose gateway stopped touching them (not those of `exclude_gateways`)."""
    rows = await db.fetch(_STALE, dt.timedelta(seconds=stale_after_s), exclude_gateways or [])
    settled = 0
    for row in rows:
        done = await settle(
            db,
            row["request_id"],
            Settlement(
                provider_id=row["provider_id"],
                prompt_tokens=row["prompt_tokens"],
                completion_tokens=row["completion_tokens"],
                cached_tokens=0,
                ttft_ms=None,
                duration_ms=None,
                outcome="gateway_lost",
            ),
        )
        settled += done
    return settled


_SNAPSHOT = """
SELECT coalesce(q.requests_per_day, $3) AS r, coalesce(q.tokens_per_day, $4) AS t, coalesce(q.concurrent, $5) AS c,
       u.window_day, u.requests, u.tokens, u.inflight
FROM (SELECT 1) AS one
LEFT JOIN account_quotas q ON q.account_id = $2
LEFT JOIN quota_usage u ON u.subject = $1
"""


async def snapshot(db: asyncpg.Pool, holder: Holder, default: Limits) -> Usage:
    """A subject's effective limits and current counters, in one query (no reservation)."""
    row = await db.fetchrow(
        _SNAPSHOT,
        holder.subject,
        holder.account_id,
        default.requests_per_day,
        default.tokens_per_day,
        default.concurrent,
    )
    assert row is not None
    limits = Limits(row["r"], row["t"], row["c"])
    return _usage_from(limits, row if row["window_day"] is not None else None, today())
