"""An owner's Macs as their account page shows them: each provider token with its Mac's name."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.providers.tokens import Db

# The page shows the most recent ones; an owner with more revokes from the operator's CLI.
MAX_LISTED = 200


@dataclass(frozen=True, slots=True)
class MacToken:
    token_id: int
    prefix: str
    provider_id: str
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


async def list_macs(db: Db, account_id: int) -> list[MacToken]:
    """The account's provider tokens, live ones first, newest first."""
    rows = await db.fetch(
        """SELECT t.id, t.prefix, t.provider_id, p.name, t.created_at, t.last_used_at, t.revoked_at
             FROM provider_tokens t JOIN providers p ON p.provider_id = t.provider_id
            WHERE t.account_id = $1
            ORDER BY t.revoked_at IS NOT NULL, t.created_at DESC, t.id DESC
            LIMIT $2""",
        account_id,
        MAX_LISTED,
    )
    return [
        MacToken(r["id"], r["prefix"], r["provider_id"], r["name"], r["created_at"], r["last_used_at"], r["revoked_at"])
        for r in rows
    ]
