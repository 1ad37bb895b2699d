"""Provider tokens (`mpp_`): how a provider daemon proves who it is (migration 0007).

A token names one provider id; the NATS auth callout checks it on every
(re)connect and gives that connection the provider's own subjects only.
Device login (the owner's browser) and the operator's CLI make them; the owner's
pages and the operator revoke them. Only their SHA-256 is stored.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from services.keys.format import PROVIDER_TOKENS, digest

Db = asyncpg.Connection | asyncpg.Pool | PoolConnectionProxy

# Told on every revocation: {"id": token id, "provider_id": ...}.
REVOKED_CHANNEL = "mp_provider_token_revoked"
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass(frozen=True, slots=True)
class TokenOwner:
    """Who a live token speaks for."""

    token_id: int
    provider_id: str
    account_id: int | None
    status: str


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What an owner or operator sees about a token (never the token)."""

    token_id: int
    provider_id: str
    account_id: int | None
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def new_provider_id() -> str:
    """A fresh provider id for a Mac signing in: a NATS subject token nobody can choose."""
    return "mac-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(16))


async def mint(db: Db, provider_id: str, *, account_id: int | None = None, name: str | None = None) -> str:
    """A new token for `provider_id` (its row made if new, owner and name recorded if given).

    A provider owned by one account never gets a token for another: that would hand
    one owner's Mac (its history, its admission) to someone else.
    """
    token = PROVIDER_TOKENS.generate()
    made = await db.fetchval(
        """WITH p AS (
               INSERT INTO providers (provider_id, account_id, name) VALUES ($1, $2, coalesce($3, ''))
               ON CONFLICT (provider_id) DO UPDATE SET
                 account_id = coalesce(providers.account_id, $2),
                 name = coalesce($3, providers.name),
                 updated_at = now()
               WHERE $2::bigint IS NULL OR providers.account_id IS NULL OR providers.account_id = $2
               RETURNING provider_id)
           INSERT INTO provider_tokens (provider_id, account_id, token_hash, prefix)
           SELECT provider_id, $2, $4, $5 FROM p
           RETURNING id""",
        provider_id,
        account_id,
        name,
        digest(token),
        PROVIDER_TOKENS.display_prefix(token),
    )
    if made is None:
        raise PermissionError(f"provider {provider_id} belongs to another account")
    return token


async def owner_of(db: Db, token: str) -> TokenOwner | None:
    """The live token's provider and its admission status; None if malformed, unknown or revoked."""
    if not PROVIDER_TOKENS.well_formed(token):
        return None
    row = await db.fetchrow(
        """UPDATE provider_tokens t SET last_used_at = now()
             FROM providers p
            WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND p.provider_id = t.provider_id
           RETURNING t.id, t.provider_id, t.account_id, p.status""",
        digest(token),
    )
    if row is None:
        return None
    return TokenOwner(row["id"], row["provider_id"], row["account_id"], row["status"])


async def revoke(db: Db, token_id: int, *, account_id: int | None = None) -> str | None:
    """Revoke one token (only the account's own when `account_id` is given); its provider id, or None."""
    provider_id: str | None = await db.fetchval(
        """UPDATE provider_tokens SET revoked_at = now()
            WHERE id = $1 AND revoked_at IS NULL AND ($2::bigint IS NULL OR account_id = $2)
           RETURNING provider_id""",
        token_id,
        account_id,
    )
    return provider_id


async def revoke_provider(db: Db, provider_id: str) -> int:
    """Revoke every live token of one provider; how many."""
    result = await db.execute(
        "UPDATE provider_tokens SET revoked_at = now() WHERE provider_id = $1 AND revoked_at IS NULL", provider_id
    )
    return int(result.split()[-1])


async def list_tokens(db: Db, *, account_id: int | None = None, provider_id: str | None = None) -> list[TokenInfo]:
    rows = await db.fetch(
        """SELECT id, provider_id, account_id, prefix, created_at, last_used_at, revoked_at
             FROM provider_tokens
            WHERE ($1::bigint IS NULL OR account_id = $1) AND ($2::text IS NULL OR provider_id = $2)
            ORDER BY created_at DESC, id DESC""",
        account_id,
        provider_id,
    )
    return [
        TokenInfo(
            r["id"], r["provider_id"], r["account_id"], r["prefix"], r["created_at"], r["last_used_at"], r["revoked_at"]
        )
        for r in rows
    ]


async def without_access(db: Db, provider_ids: list[str]) -> list[str]:
    """Those of `provider_ids` that may not connect now: banned, suspended, or no live token."""
    rows = await db.fetch(
        """SELECT u.provider_id FROM unnest($1::text[]) AS u(provider_id)
            WHERE NOT EXISTS (
                SELECT 1 FROM provider_tokens t JOIN providers p ON p.provider_id = t.provider_id
                 WHERE t.provider_id = u.provider_id AND t.revoked_at IS NULL
                   AND p.status NOT IN ('banned', 'suspended'))""",
        provider_ids,
    )
    return [r["provider_id"] for r in rows]
