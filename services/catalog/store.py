"""The model catalog in Postgres (migration 0010): which weights identities each public model id may be served as.

An entry is added by an operator (`mac-provider admin models allow`, or `trust` from a
pinned provider) and revoked, never deleted, so the record of who vouched for what stays.
The table's trigger tells every gateway replica of each change (CHANNEL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

# The notices of migration 0010's trigger: {"model_id", "weights_sha256", "active", "deleted"}.
CHANNEL = "mp_model_catalog_changed"

SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A public model id, as every buyer-facing surface accepts one (schemas/limits.py).
MODEL_ID = re.compile(r"^[^\s\x00-\x1f\x7f*>]{1,256}$")

Db = asyncpg.Pool | asyncpg.Connection


@dataclass(frozen=True, slots=True)
class Entry:
    model_id: str
    weights_sha256: str
    added_by: str
    source_provider: str | None
    note: str
    added_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None


async def active(db: Db) -> dict[str, frozenset[str]]:
    """Every model id the catalog has ever listed, with the identities listed for it now (maybe none).

    An id whose every entry was revoked stays catalogued with nothing allowed: revoking the last
    weights of an id must stop it being served, not open it to any weights as an uncatalogued id.
    """
    rows = await db.fetch("SELECT model_id, weights_sha256, revoked_at IS NULL AS active FROM model_catalog")
    catalog: dict[str, set[str]] = {}
    for row in rows:
        hashes = catalog.setdefault(row["model_id"], set())
        if row["active"]:
            hashes.add(row["weights_sha256"])
    return {model: frozenset(hashes) for model, hashes in catalog.items()}


async def allow(
    db: Db, model_id: str, sha256: str, *, added_by: str, note: str = "", source_provider: str | None = None
) -> bool:
    """List `sha256` for `model_id` (again, if it was revoked); False if it was listed already."""
    row = await db.fetchrow(
        """INSERT INTO model_catalog (model_id, weights_sha256, added_by, note, source_provider)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (model_id, weights_sha256) DO UPDATE SET
             added_by = EXCLUDED.added_by, note = EXCLUDED.note, source_provider = EXCLUDED.source_provider,
             added_at = now(), revoked_at = NULL, revoked_by = NULL
            WHERE model_catalog.revoked_at IS NOT NULL
           RETURNING 1""",
        model_id,
        sha256,
        added_by,
        note,
        source_provider,
    )
    return row is not None


async def revoke(db: Db, model_id: str, sha256: str, *, revoked_by: str) -> bool:
    """Stop serving `sha256` as `model_id`; False if it was not listed (or revoked already)."""
    result = await db.execute(
        """UPDATE model_catalog SET revoked_at = now(), revoked_by = $3
            WHERE model_id = $1 AND weights_sha256 = $2 AND revoked_at IS NULL""",
        model_id,
        sha256,
        revoked_by,
    )
    return result.endswith(" 1")


async def entries(db: Db, *, include_revoked: bool = False) -> list[Entry]:
    rows = await db.fetch(
        """SELECT * FROM model_catalog WHERE $1 OR revoked_at IS NULL
            ORDER BY model_id, revoked_at IS NOT NULL, added_at""",
        include_revoked,
    )
    return [
        Entry(
            r["model_id"],
            r["weights_sha256"],
            r["added_by"],
            r["source_provider"],
            r["note"],
            r["added_at"],
            r["revoked_at"],
            r["revoked_by"],
        )
        for r in rows
    ]


# ---- how each provider's models fare (written by gateways, read by the operator) --------------


async def record_verdicts(db: Db, provider_id: str, verdicts: list[tuple[str, str, str, bool, str]]) -> None:
    """The provider's models now: (model_id, weights_sha256, status, routed, detail); others are dropped."""
    # A heartbeat may name a model twice (a broken or hostile daemon): one row each, the first wins.
    verdicts = list({v[0]: v for v in reversed(verdicts)}.values())[::-1]
    # One statement: the rows of models it no longer reports go, the others are written if they changed.
    await db.execute(
        """WITH gone AS (
               DELETE FROM provider_models WHERE provider_id = $1 AND NOT (model_id = ANY($2::text[])))
           INSERT INTO provider_models (provider_id, model_id, weights_sha256, status, routed, detail)
           SELECT $1, m, h, s, r, d
             FROM unnest($2::text[], $3::text[], $4::text[], $5::bool[], $6::text[]) AS t(m, h, s, r, d)
           ON CONFLICT (provider_id, model_id) DO UPDATE SET
             weights_sha256 = EXCLUDED.weights_sha256, status = EXCLUDED.status, routed = EXCLUDED.routed,
             detail = EXCLUDED.detail, updated_at = now()
            WHERE (provider_models.weights_sha256, provider_models.status, provider_models.routed,
                   provider_models.detail)
                  IS DISTINCT FROM (EXCLUDED.weights_sha256, EXCLUDED.status, EXCLUDED.routed, EXCLUDED.detail)""",
        provider_id,
        [v[0] for v in verdicts],
        [v[1] for v in verdicts],
        [v[2] for v in verdicts],
        [v[3] for v in verdicts],
        [v[4][:1000] for v in verdicts],
    )


async def provider_models(db: Db, provider_id: str | None = None) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT pm.*, p.status AS provider_status, p.last_seen
             FROM provider_models pm JOIN providers p USING (provider_id)
            WHERE $1::text IS NULL OR pm.provider_id = $1
            ORDER BY pm.model_id, pm.routed DESC, pm.provider_id""",
        provider_id,
    )
    return [dict(r) for r in rows]
