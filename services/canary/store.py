"""Canaries in Postgres (migration 0010): references, runs, the per-provider schedule and its lease.

Every replica sees every provider, so the schedule is shared: `provider_canaries` holds
when each provider's next canary is due and which replica holds its lease, and a replica
takes due providers with one statement (`claim`, rows locked with SKIP LOCKED, so two
replicas never take the same one). A lease that is not given back (the replica died)
expires and another replica takes the provider.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from services.canary.compare import Answer

Db = asyncpg.Pool | asyncpg.Connection


@dataclass(frozen=True, slots=True)
class Claimed:
    provider_id: str
    # The provider's admission status (a pinned provider's answers may become references).
    status: str


async def note_seen(db: Db, provider_id: str, seen_key: str, *, due_in_s: float) -> None:
    """A provider (re)joined with these models (`seen_key`): its next canary is due within `due_in_s`.

    The first replica to say so sets the time; the others' notes of the same run change nothing.
    """
    await db.execute(
        """INSERT INTO provider_canaries (provider_id, seen_key, next_at)
           VALUES ($1, $2, now() + make_interval(secs => $3))
           ON CONFLICT (provider_id) DO UPDATE SET seen_key = EXCLUDED.seen_key,
             next_at = least(provider_canaries.next_at, EXCLUDED.next_at)
            WHERE provider_canaries.seen_key IS DISTINCT FROM EXCLUDED.seen_key""",
        provider_id,
        seen_key,
        float(due_in_s),
    )


async def claim(db: Db, gateway_id: str, provider_ids: list[str], *, lease_s: float, limit: int) -> list[Claimed]:
    """Take the lease of up to `limit` of these providers whose canary is due (one statement)."""
    if not provider_ids or limit <= 0:
        return []
    rows = await db.fetch(
        """UPDATE provider_canaries c
              SET lease_gateway = $1, lease_until = now() + make_interval(secs => $3)
             FROM (SELECT provider_id FROM provider_canaries
                    WHERE provider_id = ANY($2::text[]) AND next_at <= now()
                      AND (lease_until IS NULL OR lease_until < now())
                    ORDER BY next_at LIMIT $4
                      FOR UPDATE SKIP LOCKED) due, providers p
            WHERE c.provider_id = due.provider_id AND p.provider_id = c.provider_id
           RETURNING c.provider_id, p.status""",
        gateway_id,
        sorted(set(provider_ids)),
        float(lease_s),
        limit,
    )
    return [Claimed(r["provider_id"], r["status"]) for r in rows]


async def finish(db: Db, provider_id: str, gateway_id: str, *, next_in_s: float, result: str) -> None:
    """Give the lease back and set when the next canary is due."""
    await db.execute(
        """UPDATE provider_canaries
              SET lease_gateway = NULL, lease_until = NULL, last_run_at = now(), last_result = $3,
                  next_at = now() + make_interval(secs => $4)
            WHERE provider_id = $1 AND lease_gateway = $2""",
        provider_id,
        gateway_id,
        result,
        float(next_in_s),
    )


async def references(db: Db, sha256: str) -> dict[str, Answer]:
    """The reference answers recorded for these weights, by prompt key."""
    rows = await db.fetch(
        "SELECT prompt_key, token_ids, logprobs, margins, finish_reason FROM canary_references"
        " WHERE weights_sha256 = $1",
        sha256,
    )
    return {r["prompt_key"]: _answer(r) for r in rows}


def _answer(row: asyncpg.Record) -> Answer:
    n = len(row["token_ids"])
    logprobs = tuple(row["logprobs"]) if row["logprobs"] is not None else (None,) * n
    margins = tuple(row["margins"]) if row["margins"] is not None else (None,) * n
    if len(logprobs) != n or len(margins) != n:
        logprobs, margins = (None,) * n, (None,) * n
    return Answer(tuple(row["token_ids"]), logprobs, margins, row["finish_reason"])


async def record_reference(db: Db, sha256: str, prompt_key: str, answer: Answer, provider_id: str) -> Answer:
    """Record `answer` as the reference unless one exists; returns the reference that stands."""
    row = await db.fetchrow(
        """WITH new AS (
               INSERT INTO canary_references
                 (weights_sha256, prompt_key, token_ids, logprobs, margins, finish_reason, provider_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7)
               ON CONFLICT (weights_sha256, prompt_key) DO NOTHING
               RETURNING token_ids, logprobs, margins, finish_reason)
           SELECT * FROM new
           UNION ALL
           SELECT token_ids, logprobs, margins, finish_reason FROM canary_references
            WHERE weights_sha256 = $1 AND prompt_key = $2
           LIMIT 1""",
        sha256,
        prompt_key,
        list(answer.token_ids),
        # NULL elements where a token's value was not reported.
        list(answer.logprobs),
        list(answer.margins),
        answer.finish_reason,
        provider_id,
    )
    assert row is not None
    return _answer(row)


async def record_run(
    db: Db,
    *,
    provider_id: str,
    model_id: str,
    sha256: str,
    prompt_key: str,
    request_id: str,
    result: str,
    detail: str,
    tokens_compared: int,
    ttft_ms: float | None,
    decode_tps: float | None,
    gateway_id: str,
) -> None:
    await db.execute(
        """INSERT INTO canary_runs (provider_id, model_id, weights_sha256, prompt_key, request_id, result, detail,
                                    tokens_compared, ttft_ms, decode_tps, gateway_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)""",
        provider_id,
        model_id,
        sha256,
        prompt_key,
        request_id,
        result,
        detail[:1000],
        tokens_compared,
        ttft_ms,
        decode_tps,
        gateway_id,
    )


async def suspend(db: Db, provider_id: str, model_id: str, detail: str, *, request_id: str, gateway_id: str) -> bool:
    """Suspend a provider whose canary failed, recording why as a violation; False if it was out already.

    The providers trigger's notice withdraws it from every replica at once (its running
    requests fail over), exactly as a suspension for protocol violations does.
    """
    note = f"suspended automatically: canary failed for {model_id}: {detail}"[:1000]
    status = await db.fetchval(
        """WITH v AS (
               INSERT INTO provider_violations (provider_id, kind, detail, request_id, gateway_id)
               VALUES ($1, 'canary_failed', $2, $3, $4))
           UPDATE providers p SET
             status = CASE WHEN old.status IN ('banned', 'suspended') THEN old.status ELSE 'suspended' END,
             note = CASE WHEN old.status IN ('banned', 'suspended') THEN p.note ELSE $5 END,
             violations = p.violations + 1, last_violation = 'canary_failed', last_violation_at = now(),
             updated_at = now()
             FROM (SELECT status FROM providers WHERE provider_id = $1 FOR UPDATE) AS old
           WHERE p.provider_id = $1
           RETURNING old.status""",
        provider_id,
        f"{model_id}: {detail}"[:500],
        request_id,
        gateway_id,
        note,
    )
    return status not in ("banned", "suspended", None)


async def runs(db: Db, provider_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT * FROM canary_runs WHERE $1::text IS NULL OR provider_id = $1 ORDER BY at DESC, id DESC LIMIT $2""",
        provider_id,
        limit,
    )
    return [dict(r) for r in rows]
