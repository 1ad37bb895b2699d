"""How many demo tokens may be issued per window: per client IP, per IPv6 /64, and in all, counted in Postgres.

One statement takes a slot atomically, so any number of replicas share the
counts. Each count is a row of `demo_issuance` (its `client_ip` column names what
is counted: an address, a network such as `2001:db8::/64`, or `*` for the whole
deployment; none can be mistaken for another). The three conditional upserts run
in that order, each only if the one before took its slot, and each adds one only
while its count is under its limit (the row lock makes that exact under
concurrency; always the same order, so no deadlock).

A refusal at a later stage leaves the earlier counts one higher. That changes
nothing anyone can observe: counts only grow within a window, all three share
the window, and a full network (or deployment) stays full until the window
ends, so every later request from that address is refused there anyway. And a
request refused per address or per network never touches the global count, so
one client cannot spend the deployment's budget.

Windows older than the previous one are dropped on the way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import asyncpg

GLOBAL = "*"

_TAKE = """
WITH w AS (
    SELECT to_timestamp(floor(extract(epoch FROM now())::float8 / $3::float8) * $3::float8) AS start
),
old AS (
    DELETE FROM demo_issuance WHERE window_start < (SELECT start FROM w) - make_interval(secs => $3::float8)
),
ip AS (
    INSERT INTO demo_issuance (client_ip, window_start, issued)
    SELECT $1, start, 1 FROM w WHERE $4::int > 0
    ON CONFLICT (client_ip, window_start) DO UPDATE SET issued = demo_issuance.issued + 1
        WHERE demo_issuance.issued < $4::int
    RETURNING issued
),
net AS (
    INSERT INTO demo_issuance (client_ip, window_start, issued)
    SELECT $2::text, start, 1 FROM w WHERE $2::text IS NOT NULL AND $5::int > 0 AND EXISTS (SELECT FROM ip)
    ON CONFLICT (client_ip, window_start) DO UPDATE SET issued = demo_issuance.issued + 1
        WHERE demo_issuance.issued < $5::int
    RETURNING issued
),
net_ok AS (
    SELECT EXISTS (SELECT FROM ip) AND ($2::text IS NULL OR EXISTS (SELECT FROM net)) AS ok
),
everyone AS (
    INSERT INTO demo_issuance (client_ip, window_start, issued)
    SELECT '*', start, 1 FROM w WHERE $6::int > 0 AND (SELECT ok FROM net_ok)
    ON CONFLICT (client_ip, window_start) DO UPDATE SET issued = demo_issuance.issued + 1
        WHERE demo_issuance.issued < $6::int
    RETURNING issued
)
SELECT EXISTS (SELECT FROM ip) AS ip_ok,
       (SELECT ok FROM net_ok) AS net_ok,
       EXISTS (SELECT FROM everyone) AS global_ok,
       extract(epoch FROM (SELECT start FROM w) + make_interval(secs => $3::float8) - now())::float8 AS reset_in
"""


@dataclass(frozen=True, slots=True)
class DemoLimits:
    per_ip: int
    per_net64: int
    total: int
    window_s: float


@dataclass(frozen=True, slots=True)
class Refused:
    # Which count was full: the address, its IPv6 /64, or the whole deployment's.
    scope: Literal["ip", "net64", "global"]
    # Seconds until the window resets.
    retry_after: int


async def take_demo_slot(db: asyncpg.Pool, client_ip: str, net64: str | None, limits: DemoLimits) -> Refused | None:
    """None if a token may be issued now; otherwise which limit refused it and until when."""
    row = await db.fetchrow(_TAKE, client_ip, net64, limits.window_s, limits.per_ip, limits.per_net64, limits.total)
    assert row is not None
    if row["global_ok"]:
        return None
    scope: Literal["ip", "net64", "global"] = "ip" if not row["ip_ok"] else "net64" if not row["net_ok"] else "global"
    return Refused(scope=scope, retry_after=max(1, math.ceil(row["reset_in"])))
