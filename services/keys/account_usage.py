"""What the account page shows of an account's use: today against its quotas, 30 days, recent requests.

Read-only: the counters and the ledger the usage service keeps (services/usage/), for the account
as a whole (every key of it), the way the quotas count.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import asyncpg

from services.settings import Settings
from services.usage import quotas
from services.usage.metering import default_limits

DAYS = 30
RECENT = 20


@dataclass(frozen=True)
class DayUse:
    day: dt.date
    requests: int
    tokens: int


@dataclass(frozen=True)
class RecentRequest:
    request_id: str
    model: str
    created_at: dt.datetime
    tokens: int
    outcome: str
    rating: int | None


@dataclass(frozen=True)
class AccountUsage:
    today: quotas.Usage
    days: list[DayUse]  # oldest first, one per day, today last
    recent: list[RecentRequest]


async def account_usage(db: asyncpg.Pool, account_id: int, settings: Settings) -> AccountUsage:
    subject = f"a{account_id}"
    today = await quotas.snapshot(db, quotas.Holder(subject, account_id, None, None), default_limits(settings))
    first = today.window_day - dt.timedelta(days=DAYS - 1)
    rows = await db.fetch(
        """SELECT (created_at AT TIME ZONE 'UTC')::date AS day, count(*) AS requests,
                  sum(prompt_tokens + completion_tokens) AS tokens
           FROM usage_ledger WHERE subject = $1 AND billed AND created_at >= $2 GROUP BY 1""",
        subject,
        dt.datetime.combine(first, dt.time(), tzinfo=dt.UTC),
    )
    by_day = {r["day"]: r for r in rows}
    days = [
        DayUse(day, int(by_day[day]["requests"]), int(by_day[day]["tokens"] or 0))
        if day in by_day
        else DayUse(day, 0, 0)
        for day in (first + dt.timedelta(days=i) for i in range(DAYS))
    ]
    recent = await db.fetch(
        """SELECT l.request_id, l.model, l.created_at, l.prompt_tokens + l.completion_tokens AS tokens, l.outcome,
                  f.rating
           FROM usage_ledger l LEFT JOIN feedback f USING (request_id)
           WHERE l.subject = $1 ORDER BY l.created_at DESC LIMIT $2""",
        subject,
        RECENT,
    )
    return AccountUsage(
        today=today,
        days=days,
        recent=[
            RecentRequest(r["request_id"], r["model"], r["created_at"], int(r["tokens"]), r["outcome"], r["rating"])
            for r in recent
        ],
    )
