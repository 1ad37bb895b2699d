"""Provider admission in Postgres (migration 0005): sightings, provisional admission, operator changes.

Every gateway replica sees every heartbeat, so for a new provider id all of them
try to admit it at about the same moment. `try_admit` is one statement that
(1) locks the provider's pending row, skipping it if another replica holds it,
(2) takes a token from the one-row bucket only when it got that row, and
(3) marks the provider provisional. The bucket's row lock orders all replicas'
draws, so no more than the configured rate is ever admitted, and a provider
admitted by one replica never costs a second token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

# The notices of migration 0006's trigger: {"id", "status", "draining", "max_slots"}.
CHANNEL = "mp_provider_changed"
# "suspended": stopped automatically after repeated protocol violations (services/providers/violations.py).
STATUSES = ("pending", "provisional", "pinned", "banned", "suspended")

Db = asyncpg.Pool | asyncpg.Connection


@dataclass(frozen=True, slots=True)
class ProviderState:
    provider_id: str
    status: str
    draining: bool
    max_slots: int | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    admitted: bool
    # False when the id was not pending any more (another replica admitted it, or an operator acted).
    contended: bool
    # When the bucket was empty: seconds until it holds a token again.
    retry_after_s: float


_SIGHT = """
WITH new AS (
    INSERT INTO providers (provider_id, first_seen, last_seen)
    SELECT id, now(), now() FROM unnest($1::text[]) AS id
    -- A row made before its first heartbeat (a token minted, an operator's pin) is seen now.
    ON CONFLICT (provider_id) DO UPDATE SET first_seen = now(), last_seen = now()
        WHERE providers.first_seen IS NULL
    RETURNING provider_id, status, draining, max_slots)
SELECT provider_id, status, draining, max_slots FROM new
UNION ALL
SELECT provider_id, status, draining, max_slots FROM providers WHERE provider_id = ANY($1::text[])
"""

# $2: the rate per minute, which is also the bucket's capacity (a burst of at most one minute's worth).
_LEVEL = "least($2, coalesce(tokens, $2) + greatest(0, extract(epoch FROM now() - refilled_at)) * $2 / 60.0)"

_ADMIT = f"""
WITH candidate AS (
    SELECT provider_id FROM providers
     WHERE provider_id = $1 AND status = 'pending'
       FOR UPDATE SKIP LOCKED),
token AS (
    UPDATE provider_admission_bucket
       SET tokens = {_LEVEL} - 1, refilled_at = greatest(refilled_at, now())
     WHERE id = 1 AND EXISTS (SELECT 1 FROM candidate) AND {_LEVEL} >= 1
    RETURNING 1),
admitted AS (
    UPDATE providers p
       SET status = 'provisional', admitted_at = now(), updated_at = now()
      FROM candidate, token
     WHERE p.provider_id = candidate.provider_id
    RETURNING 1)
SELECT (SELECT count(*) FROM candidate) AS candidates,
       (SELECT count(*) FROM admitted) AS admitted,
       (SELECT {_LEVEL} FROM provider_admission_bucket WHERE id = 1) AS level
"""

_TOUCH = """
UPDATE providers SET last_seen = now(), first_seen = coalesce(first_seen, now())
 WHERE provider_id = ANY($1::text[])
   AND (last_seen IS NULL OR last_seen < now() - make_interval(secs => $2))
"""


def _state(row: asyncpg.Record) -> ProviderState:
    return ProviderState(row["provider_id"], row["status"], row["draining"], row["max_slots"])


async def sight(db: Db, provider_ids: list[str]) -> dict[str, ProviderState]:
    """Record ids never seen before as pending; what is known of each id, in one statement.

    An id another replica inserts at the same instant may be missing from the
    answer (it committed after this statement's snapshot): ask again later.
    """
    rows = await db.fetch(_SIGHT, sorted(set(provider_ids)))
    return {row["provider_id"]: _state(row) for row in rows}


async def try_admit(db: Db, provider_id: str, per_minute: int) -> Attempt:
    """Admit a pending provider provisionally if the shared bucket holds a token (one statement)."""
    row = await db.fetchrow(_ADMIT, provider_id, float(per_minute))
    assert row is not None
    level = float(row["level"] if row["level"] is not None else per_minute)
    retry = max(0.0, (1.0 - level) * 60.0 / per_minute)
    return Attempt(admitted=row["admitted"] == 1, contended=row["candidates"] == 0, retry_after_s=retry)


async def touch(db: Db, provider_ids: list[str], *, older_than_s: float) -> None:
    """Note that these providers are alive; rows written less than `older_than_s` ago are left alone."""
    # Sorted, so replicas lock rows in one order and never deadlock one another.
    await db.execute(_TOUCH, sorted(set(provider_ids)), float(older_than_s))


# ---- operator changes (the admin CLI) -------------------------------------------------------


async def set_status(db: Db, provider_id: str, status: str, note: str | None) -> dict[str, Any]:
    """Pin, ban or re-admit a provider, known or not yet seen."""
    row = await db.fetchrow(
        """INSERT INTO providers (provider_id, status, note, admitted_at)
           VALUES ($1, $2, coalesce($3, ''), CASE WHEN $2 IN ('pinned', 'provisional') THEN now() END)
           ON CONFLICT (provider_id) DO UPDATE SET
             status = $2,
             note = coalesce($3, providers.note),
             admitted_at = CASE WHEN $2 IN ('pinned', 'provisional')
                                THEN coalesce(providers.admitted_at, now()) ELSE providers.admitted_at END,
             updated_at = now()
           RETURNING *""",
        provider_id,
        status,
        note,
    )
    return dict(row) if row is not None else {}


async def change_status(db: Db, provider_id: str, *, from_status: str, to_status: str, note: str | None) -> bool:
    """Move a provider from one status to another (unpin, unban); False if it was not `from_status`."""
    result = await db.execute(
        """UPDATE providers SET status = $3, note = coalesce($4, note), updated_at = now(),
                  admitted_at = coalesce(admitted_at, now())
            WHERE provider_id = $1 AND status = $2""",
        provider_id,
        from_status,
        to_status,
        note,
    )
    return result.endswith(" 1")


async def set_draining(db: Db, provider_id: str, draining: bool, note: str | None) -> dict[str, Any]:
    row = await db.fetchrow(
        """INSERT INTO providers (provider_id, draining, note) VALUES ($1, $2, coalesce($3, ''))
           ON CONFLICT (provider_id) DO UPDATE SET
             draining = $2, note = coalesce($3, providers.note), updated_at = now()
           RETURNING *""",
        provider_id,
        draining,
        note,
    )
    return dict(row) if row is not None else {}


async def set_max_slots(db: Db, provider_id: str, max_slots: int | None) -> dict[str, Any]:
    """The most slots gateways believe this provider claims (None: back to the default cap)."""
    row = await db.fetchrow(
        """INSERT INTO providers (provider_id, max_slots) VALUES ($1, $2)
           ON CONFLICT (provider_id) DO UPDATE SET max_slots = $2, updated_at = now()
           RETURNING *""",
        provider_id,
        max_slots,
    )
    return dict(row) if row is not None else {}


async def list_providers(db: Db, status: str | None = None) -> list[dict[str, Any]]:
    """Providers with their violations of the last day (the column `violations` counts all time)."""
    rows = await db.fetch(
        """SELECT p.*,
                  (SELECT coalesce(sum(v.occurrences), 0)::bigint FROM provider_violations v
                    WHERE v.provider_id = p.provider_id AND v.at > now() - interval '1 day') AS violations_24h
             FROM providers p WHERE $1::text IS NULL OR p.status = $1
            ORDER BY array_position(ARRAY['pinned', 'provisional', 'pending', 'suspended', 'banned'], p.status),
                     p.last_seen DESC NULLS LAST, p.provider_id""",
        status,
    )
    return [dict(r) for r in rows]
