"""A provider's own view of its Macs: admission, models, traffic, violations, and why no traffic.

Facts come from Postgres (admission, ownership, sightings, violations, the ledger)
and from this replica's pool view (who is heartbeating now, slots, measured
speed). `why_no_traffic` turns them into plain sentences, most fundamental first,
so an owner whose Mac sits idle reads the one thing to fix.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

import asyncpg
import msgspec

from services.gateway.pool import PoolView, ProviderState

# A Mac this much slower than the pool's median for a model is routed after the others.
SLOW_FACTOR = 0.5

Traffic = Literal["routable", "not_routable"]


class MacModel(msgspec.Struct, frozen=True):
    id: str
    loaded: bool
    # Whether gateways route this model to this Mac now.
    routed: bool
    # "verified", or why not (the catalog's verdict on the weights hash the Mac reports).
    verification: str = "unchecked"
    reason: str = ""


class Traffic24h(msgspec.Struct, frozen=True):
    requests: int
    tokens: int


class Mac(msgspec.Struct, frozen=True):
    provider_id: str
    name: str
    # pending | provisional | pinned | banned | suspended
    admission: str
    draining: bool
    online: bool
    first_seen: datetime | None
    last_seen: datetime | None
    models: list[MacModel]
    slots: int
    slots_free: int
    # Measured by the control plane (None until it has served something).
    decode_tokens_per_s: float | None
    first_token_s: float | None
    worker: str
    served_24h: Traffic24h
    served_30d: Traffic24h
    violations_24h: int
    violations: int
    last_violation: str | None
    last_violation_at: datetime | None
    note: str
    traffic: Traffic
    why_no_traffic: list[str]
    object: Literal["provider.mac"] = "provider.mac"


class MacList(msgspec.Struct, frozen=True):
    data: list[Mac]
    object: Literal["list"] = "list"


_MACS = """
SELECT p.provider_id, p.name, p.status, p.draining, p.first_seen, p.last_seen, p.note,
       p.violations, p.last_violation, p.last_violation_at,
       (SELECT coalesce(sum(v.occurrences), 0)::bigint FROM provider_violations v
         WHERE v.provider_id = p.provider_id AND v.at > now() - interval '1 day') AS violations_24h,
       coalesce(l.requests_24h, 0) AS requests_24h, coalesce(l.tokens_24h, 0) AS tokens_24h,
       coalesce(l.requests_30d, 0) AS requests_30d, coalesce(l.tokens_30d, 0) AS tokens_30d
  FROM providers p
  LEFT JOIN LATERAL (
      SELECT count(*) FILTER (WHERE u.created_at > now() - interval '1 day') AS requests_24h,
             coalesce(sum(u.completion_tokens) FILTER (WHERE u.created_at > now() - interval '1 day'), 0)
               AS tokens_24h,
             count(*) AS requests_30d, coalesce(sum(u.completion_tokens), 0) AS tokens_30d
        FROM usage_ledger u
       WHERE u.provider_id = p.provider_id AND u.created_at > now() - interval '30 days'
         AND u.outcome IN ('ok', 'cancelled')) l ON true
 WHERE ($1::bigint IS NULL OR p.account_id = $1) AND ($2::text IS NULL OR p.provider_id = $2)
 ORDER BY p.name, p.provider_id
"""


async def macs(
    db: asyncpg.Pool, pool: PoolView, *, account_id: int | None, provider_id: str | None, admissions_per_min: int
) -> list[Mac]:
    """The Macs of one account (or the one Mac `provider_id`), with this replica's live view."""
    if account_id is None and provider_id is None:
        return []
    rows = await db.fetch(_MACS, account_id, provider_id)
    return [_mac(row, pool, admissions_per_min) for row in rows]


def _mac(row: asyncpg.Record, pool: PoolView, admissions_per_min: int) -> Mac:
    live = pool.providers.get(row["provider_id"])
    observed = pool.measured(row["provider_id"]) if live is not None else None
    models = _models(live)
    why = why_no_traffic(
        admission=row["status"],
        draining=row["draining"],
        note=row["note"],
        last_violation=row["last_violation"],
        last_seen=row["last_seen"],
        live=live,
        pool=pool,
        models=models,
        admissions_per_min=admissions_per_min,
    )
    return Mac(
        provider_id=row["provider_id"],
        name=row["name"],
        admission=row["status"],
        draining=row["draining"],
        online=live is not None,
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        models=models,
        slots=live.heartbeat.slots if live else 0,
        slots_free=max(0, live.free_slots()) if live else 0,
        decode_tokens_per_s=round(observed.decode_tps, 1) if observed and observed.decode_tps else None,
        first_token_s=round(observed.first_token_s, 3) if observed and observed.first_token_s else None,
        worker=live.heartbeat.worker if live else "offline",
        served_24h=Traffic24h(int(row["requests_24h"]), int(row["tokens_24h"])),
        served_30d=Traffic24h(int(row["requests_30d"]), int(row["tokens_30d"])),
        violations_24h=int(row["violations_24h"]),
        violations=int(row["violations"]),
        last_violation=row["last_violation"],
        last_violation_at=row["last_violation_at"],
        note=row["note"],
        traffic="not_routable" if _blocking(why) else "routable",
        why_no_traffic=[text for _, text in why],
    )


def _models(live: ProviderState | None) -> list[MacModel]:
    if live is None:
        return []
    return [MacModel(id=m.id, loaded=m.loaded, routed=True) for m in live.heartbeat.models]


# (blocking, sentence): a blocking reason means gateways send it nothing; the others explain less.
Reason = tuple[bool, str]


def _blocking(reasons: Sequence[Reason]) -> bool:
    return any(blocking for blocking, _ in reasons)


def _ago(when: datetime | None) -> str:
    return "never" if when is None else when.strftime("%Y-%m-%d %H:%M UTC")


def why_no_traffic(
    *,
    admission: str,
    draining: bool,
    note: str,
    last_violation: str | None,
    last_seen: datetime | None,
    live: ProviderState | None,
    pool: PoolView,
    models: Sequence[MacModel],
    admissions_per_min: int,
) -> list[Reason]:
    """Why this Mac gets no (or little) traffic, most fundamental first; empty when nothing holds it back."""
    reasons: list[Reason] = []
    if admission == "banned":
        reasons.append((True, "Banned by the operator" + (f": {note}." if note else ".")))
    elif admission == "suspended":
        reasons.append(
            (True, f"Suspended automatically ({last_violation or 'protocol violations'}); ask the operator to review.")
        )
    elif admission == "pending":
        reasons.append(
            (
                True,
                "Pending admission: new Macs are admitted as capacity allows "
                f"(at most {admissions_per_min} a minute across the pool) or pinned by the operator.",
            )
        )
    if draining:
        reasons.append((True, "Draining: it finishes its running requests and takes no new ones."))
    if live is None:
        reasons.append((True, f"Offline: no heartbeat heard since {_ago(last_seen)}."))
        return reasons
    if live.heartbeat.worker not in ("healthy", "idle"):
        reasons.append((True, f"Its inference worker is {live.heartbeat.worker}."))
    if not models:
        reasons.append((True, "It serves no model."))
    for m in models:
        if not m.routed:
            reasons.append((True, f"{m.id}: not routed: {m.reason or m.verification}."))
    if pool.suspect(live):
        reasons.append((False, "It failed a request lately, so gateways try other Macs first for a minute."))
    slower = _slower_than_pool(live, pool)
    if slower:
        reasons.append((False, slower))
    if live.free_slots() <= 0 and not _blocking(reasons):
        reasons.append((False, "All its slots are busy right now."))
    return reasons


def _slower_than_pool(live: ProviderState, pool: PoolView) -> str | None:
    mine = pool.measured(live.provider_id).decode_tps
    if not mine:
        return None
    for m in live.heartbeat.models:
        peers = [
            tps
            for s in pool.models().get(m.id, [])
            if s.provider_id != live.provider_id and (tps := pool.measured(s.provider_id).decode_tps)
        ]
        if len(peers) >= 2 and mine < SLOW_FACTOR * statistics.median(peers):
            return (
                f"Slower than the pool for {m.id}: {mine:.1f} tokens/s against a median of "
                f"{statistics.median(peers):.1f}; gateways prefer faster Macs when they have room."
            )
    return None
