"""A provider's own view of its Macs: admission, models, traffic, violations, and why no traffic.

Facts come from Postgres (admission, ownership, sightings, violations, the ledger)
and from this replica's pool view (who is heartbeating now, slots, measured
speed). `why_no_traffic` turns them into plain sentences, most fundamental first,
so an owner whose Mac sits idle reads the one thing to fix.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

import asyncpg
import msgspec

from services.gateway.pool import PoolView, ProviderState

# A Mac heard from within this many seconds counts as online even if this replica's pool holds it
# not (sightings are written every 15 s or so; services/providers/admission.py).
HEARD_LATELY_S = 45.0
# A Mac this much slower than the pool's median for a model is routed after the others.
SLOW_FACTOR = 0.5

Traffic = Literal["routable", "not_routable"]


class MacModel(msgspec.Struct, frozen=True):
    id: str
    loaded: bool
    # Whether gateways route this model to this Mac now.
    routed: bool
    # The catalog's verdict on the weights the Mac reports (services/catalog/): verified,
    # uncatalogued, not_in_catalog, hash_mismatch, hash_pending, canary_failed; "unchecked" until judged.
    verification: str = "unchecked"
    reason: str = ""
    weights_sha256: str = ""


class Canaries(msgspec.Struct, frozen=True):
    """Spot checks of this Mac's answers against a trusted Mac's (services/canary/), last 30 days."""

    passed: int
    failed: int
    last_result: str | None
    last_detail: str
    last_at: datetime | None
    # What the last canary measured.
    first_token_ms: float | None
    decode_tokens_per_s: float | None


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
    # Seconds the daemon has run without a restart, as far as this control plane has heard it.
    uptime_s: float | None
    served_24h: Traffic24h
    served_30d: Traffic24h
    violations_24h: int
    violations: int
    last_violation: str | None
    last_violation_at: datetime | None
    canaries: Canaries
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
       coalesce(l.requests_30d, 0) AS requests_30d, coalesce(l.tokens_30d, 0) AS tokens_30d,
       p.last_seen > now() - make_interval(secs => $3) AS heard_lately,
       coalesce(c.passed, 0) AS canaries_passed, coalesce(c.failed, 0) AS canaries_failed,
       lc.result AS canary_result, coalesce(lc.detail, '') AS canary_detail, lc.at AS canary_at,
       lc.ttft_ms AS canary_ttft_ms, lc.decode_tps AS canary_tps,
       coalesce(m.models, '[]'::json) AS models
  FROM providers p
  LEFT JOIN LATERAL (
      SELECT count(*) FILTER (WHERE u.created_at > now() - interval '1 day') AS requests_24h,
             coalesce(sum(u.completion_tokens) FILTER (WHERE u.created_at > now() - interval '1 day'), 0)
               AS tokens_24h,
             count(*) AS requests_30d, coalesce(sum(u.completion_tokens), 0) AS tokens_30d
        FROM usage_ledger u
       WHERE u.provider_id = p.provider_id AND u.created_at > now() - interval '30 days'
         AND u.outcome IN ('ok', 'cancelled')) l ON true
  LEFT JOIN LATERAL (
      SELECT count(*) FILTER (WHERE r.result = 'passed') AS passed,
             count(*) FILTER (WHERE r.result = 'failed') AS failed
        FROM canary_runs r WHERE r.provider_id = p.provider_id AND r.at > now() - interval '30 days') c ON true
  LEFT JOIN LATERAL (
      SELECT r.result, r.detail, r.at, r.ttft_ms, r.decode_tps FROM canary_runs r
       WHERE r.provider_id = p.provider_id ORDER BY r.at DESC LIMIT 1) lc ON true
  LEFT JOIN LATERAL (
      SELECT json_agg(json_build_object('id', pm.model_id, 'status', pm.status, 'routed', pm.routed,
                                        'detail', pm.detail, 'sha', pm.weights_sha256) ORDER BY pm.model_id) AS models
        FROM provider_models pm WHERE pm.provider_id = p.provider_id) m ON true
 WHERE ($1::bigint IS NULL OR p.account_id = $1) AND ($2::text IS NULL OR p.provider_id = $2)
 ORDER BY p.name, p.provider_id
"""


async def macs(
    db: asyncpg.Pool, pool: PoolView, *, account_id: int | None, provider_id: str | None, admissions_per_min: int
) -> list[Mac]:
    """The Macs of one account (or the one Mac `provider_id`), with this replica's live view."""
    if account_id is None and provider_id is None:
        return []
    rows = await db.fetch(_MACS, account_id, provider_id, HEARD_LATELY_S)
    return [_mac(row, pool, admissions_per_min) for row in rows]


def _mac(row: asyncpg.Record, pool: PoolView, admissions_per_min: int) -> Mac:
    live = pool.providers.get(row["provider_id"])
    observed = pool.measured(row["provider_id"]) if live is not None else None
    models = _models(live, _verdicts(row["models"]))
    why = why_no_traffic(
        admission=row["status"],
        draining=row["draining"],
        note=row["note"],
        last_violation=row["last_violation"],
        last_seen=row["last_seen"],
        heard_lately=bool(row["heard_lately"]),
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
        online=live is not None or bool(row["heard_lately"]),
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        models=models,
        slots=live.heartbeat.slots if live else 0,
        slots_free=max(0, live.free_slots()) if live else 0,
        decode_tokens_per_s=round(observed.decode_tps, 1) if observed and observed.decode_tps else None,
        first_token_s=round(observed.first_token_s, 3) if observed and observed.first_token_s else None,
        worker=live.heartbeat.worker if live else "offline",
        uptime_s=round(time.time() - observed.up_since, 1) if observed and observed.up_since else None,
        served_24h=Traffic24h(int(row["requests_24h"]), int(row["tokens_24h"])),
        served_30d=Traffic24h(int(row["requests_30d"]), int(row["tokens_30d"])),
        violations_24h=int(row["violations_24h"]),
        violations=int(row["violations"]),
        last_violation=row["last_violation"],
        last_violation_at=row["last_violation_at"],
        canaries=Canaries(
            passed=int(row["canaries_passed"]),
            failed=int(row["canaries_failed"]),
            last_result=row["canary_result"],
            last_detail=row["canary_detail"],
            last_at=row["canary_at"],
            first_token_ms=row["canary_ttft_ms"],
            decode_tokens_per_s=row["canary_tps"],
        ),
        note=row["note"],
        traffic="not_routable" if _blocking(why) else "routable",
        why_no_traffic=[text for _, text in why],
    )


def _verdicts(raw: object) -> dict[str, dict[str, object]]:
    rows = msgspec.json.decode(raw) if isinstance(raw, (str, bytes)) else raw
    return {str(v["id"]): v for v in rows or []} if isinstance(rows, list) else {}


def _models(live: ProviderState | None, verdicts: dict[str, dict[str, object]]) -> list[MacModel]:
    """Each model the Mac serves, routed or not: this replica's pool view, and the pool's recorded verdicts.

    Models a gateway will not route are not in its pool view at all, so those come from the
    verdicts every replica writes (`provider_models`).
    """
    out: dict[str, MacModel] = {}
    for m in live.heartbeat.models if live is not None else ():
        v = verdicts.get(m.id, {})
        out[m.id] = MacModel(
            id=m.id,
            loaded=m.loaded,
            routed=True,
            verification=str(v.get("status") or "unchecked"),
            reason=str(v.get("detail") or ""),
            weights_sha256=m.weights_sha256,
        )
    for model_id, v in verdicts.items():
        if model_id not in out and (live is not None or not v.get("routed")):
            out[model_id] = MacModel(
                id=model_id,
                loaded=live is not None,
                routed=False,
                verification=str(v.get("status") or "unchecked"),
                reason=str(v.get("detail") or ""),
                weights_sha256=str(v.get("sha") or ""),
            )
    return sorted(out.values(), key=lambda m: m.id)


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
    heard_lately: bool,
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
        if not heard_lately:
            reasons.append((True, f"Offline: no heartbeat heard since {_ago(last_seen)}."))
            return reasons
        # Heard, but not in this gateway's pool: none of its models may be routed (below), or it
        # is not admitted (above).
        for m in models:
            if not m.routed:
                reasons.append((True, f"{m.id}: not routed: {_verdict_text(m)}."))
        if not reasons:
            reasons.append((True, "Heard from lately, but not in the pool right now (restarting?)."))
        return reasons
    if live.heartbeat.worker not in ("healthy", "idle"):
        reasons.append((True, f"Its inference worker is {live.heartbeat.worker}."))
    if not models:
        reasons.append((True, "It serves no model."))
    for m in models:
        if not m.routed:
            reasons.append((True, f"{m.id}: not routed: {_verdict_text(m)}."))
    if pool.suspect(live):
        reasons.append((False, "It failed a request lately, so gateways try other Macs first for a minute."))
    slower = _slower_than_pool(live, pool)
    if slower:
        reasons.append((False, slower))
    if live.free_slots() <= 0 and not _blocking(reasons):
        reasons.append((False, "All its slots are busy right now."))
    return reasons


_VERDICTS = {
    "not_in_catalog": "its id is not in the operator's model catalog",
    "hash_mismatch": "its weights are not the ones the catalog lists for this id",
    "hash_pending": "its weights are still being hashed",
    "canary_failed": "its answers did not match a trusted Mac's (canary check)",
}


def _verdict_text(m: MacModel) -> str:
    text = _VERDICTS.get(m.verification, m.verification)
    return f"{text} ({m.reason})" if m.reason and m.reason not in text else text


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
