"""How many demo tokens a client IP may get per window, counted in Postgres.

One statement takes a slot atomically, so any number of replicas share one
count: the conditional upsert adds one only while the window is under its limit.
Windows older than the previous one are dropped on the way.
"""

from __future__ import annotations

import math

import asyncpg

_TAKE = """
WITH w AS (
    SELECT to_timestamp(floor(extract(epoch FROM now())::float8 / $2::float8) * $2::float8) AS start
),
old AS (
    DELETE FROM demo_issuance WHERE window_start < (SELECT start FROM w) - make_interval(secs => $2::float8)
),
taken AS (
    INSERT INTO demo_issuance (client_ip, window_start, issued)
    SELECT $1, start, 1 FROM w
    ON CONFLICT (client_ip, window_start) DO UPDATE SET issued = demo_issuance.issued + 1
        WHERE demo_issuance.issued < $3
    RETURNING issued
)
SELECT (SELECT issued FROM taken) AS issued,
       extract(epoch FROM (SELECT start FROM w) + make_interval(secs => $2::float8) - now())::float8 AS reset_in
"""


async def take_demo_slot(db: asyncpg.Pool, client_ip: str, *, limit: int, window_s: float) -> int | None:
    """None if a token may be issued now; otherwise the seconds until this IP's window resets."""
    row = await db.fetchrow(_TAKE, client_ip, window_s, limit)
    assert row is not None
    if row["issued"] is not None and limit > 0:
        return None
    return max(1, math.ceil(row["reset_in"]))
