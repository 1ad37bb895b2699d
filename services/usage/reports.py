"""Read side of the ledger: what `/v1/usage` shows and operators review."""

from __future__ import annotations

import datetime as dt

import asyncpg
import msgspec

from services.usage.quotas import Usage


class Counter(msgspec.Struct, frozen=True):
    limit: int
    used: int
    remaining: int


class Concurrency(msgspec.Struct, frozen=True):
    limit: int
    in_flight: int


class Quotas(msgspec.Struct, frozen=True):
    requests_per_day: Counter
    tokens_per_day: Counter
    concurrent_requests: Concurrency


class Window(msgspec.Struct, frozen=True):
    day: str
    resets_at: str
    resets_in_s: int


class KeyInfo(msgspec.Struct, frozen=True):
    id: int
    prefix: str
    requests_today: int


class ModelDay(msgspec.Struct, frozen=True):
    day: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int


class Ratings(msgspec.Struct, frozen=True):
    count: int
    average: float | None
    # How many ratings of 1, 2, 3, 4 and 5.
    distribution: dict[str, int]


class DemoTokenInfo(msgspec.Struct, frozen=True):
    # The demo token's id (its quota subject), not the token.
    id: str
    expires_at: int


class UsageReport(msgspec.Struct, frozen=True):
    # An API key's report names its account and key; a demo token's, the token (null otherwise).
    account_id: int | None
    key: KeyInfo | None
    window: Window
    quotas: Quotas
    days: int
    by_model: list[ModelDay]
    ratings: Ratings
    demo_token: DemoTokenInfo | None = None
    object: str = "usage"


def quotas_of(usage: Usage) -> Quotas:
    lim = usage.limits
    return Quotas(
        requests_per_day=Counter(lim.requests_per_day, usage.requests, usage.requests_left),
        tokens_per_day=Counter(lim.tokens_per_day, usage.tokens, usage.tokens_left),
        concurrent_requests=Concurrency(lim.concurrent, usage.inflight),
    )


async def by_model(db: asyncpg.Pool, subject: str, since: dt.datetime) -> list[ModelDay]:
    rows = await db.fetch(
        """SELECT (created_at AT TIME ZONE 'UTC')::date AS day, model, count(*) AS requests,
                  sum(prompt_tokens) AS prompt, sum(completion_tokens) AS completion, sum(cached_tokens) AS cached
           FROM usage_ledger WHERE subject = $1 AND billed AND created_at >= $2
           GROUP BY 1, 2 ORDER BY 1 DESC, 2""",
        subject,
        since,
    )
    return [
        ModelDay(
            day=r["day"].isoformat(),
            model=r["model"],
            requests=r["requests"],
            prompt_tokens=r["prompt"],
            completion_tokens=r["completion"],
            cached_tokens=r["cached"],
            total_tokens=r["prompt"] + r["completion"],
        )
        for r in rows
    ]


async def key_requests_today(db: asyncpg.Pool, key_id: int, day: dt.date) -> int:
    since = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    count: int = await db.fetchval(
        "SELECT count(*) FROM usage_ledger WHERE key_id = $1 AND billed AND created_at >= $2", key_id, since
    )
    return count


async def ratings(db: asyncpg.Pool, subject: str, since: dt.datetime) -> Ratings:
    rows = await db.fetch(
        """SELECT f.rating, count(*) AS n FROM feedback f JOIN usage_ledger l USING (request_id)
           WHERE l.subject = $1 AND f.updated_at >= $2 GROUP BY f.rating""",
        subject,
        since,
    )
    distribution = {str(i): 0 for i in range(1, 6)}
    for r in rows:
        distribution[str(r["rating"])] = r["n"]
    count = sum(distribution.values())
    total = sum(int(k) * v for k, v in distribution.items())
    return Ratings(count=count, average=round(total / count, 2) if count else None, distribution=distribution)


class FeedbackRow(msgspec.Struct, frozen=True):
    request_id: str
    rating: int
    comment: str
    model: str
    provider_id: str | None
    account_id: int | None
    updated_at: str


async def recent_feedback(
    db: asyncpg.Pool,
    *,
    model: str | None = None,
    provider: str | None = None,
    rating: int | None = None,
    limit: int = 50,
) -> list[FeedbackRow]:
    rows = await db.fetch(
        """SELECT f.request_id, f.rating, f.comment, l.model, l.provider_id, l.account_id, f.updated_at
           FROM feedback f JOIN usage_ledger l USING (request_id)
           WHERE ($1::text IS NULL OR l.model = $1)
             AND ($2::text IS NULL OR l.provider_id = $2)
             AND ($3::int IS NULL OR f.rating = $3)
           ORDER BY f.updated_at DESC LIMIT $4""",
        model,
        provider,
        rating,
        limit,
    )
    return [
        FeedbackRow(
            request_id=r["request_id"],
            rating=r["rating"],
            comment=r["comment"],
            model=r["model"],
            provider_id=r["provider_id"],
            account_id=r["account_id"],
            updated_at=r["updated_at"].isoformat(),
        )
        for r in rows
    ]
