"""Sign-ins in flight: an unguessable single-use `state` and its PKCE verifier, in Postgres.

Any replica may serve the callback. Only the state's SHA-256 is stored (the
browser holds the value). Taking a state deletes it, so it works once.
"""

from __future__ import annotations

import hashlib
import secrets

import asyncpg


def _hash(state: str) -> bytes:
    return hashlib.sha256(state.encode()).digest()


async def open_state(db: asyncpg.Pool, *, ttl_s: float) -> tuple[str, str]:
    """A new (state, code_verifier) pair; expired rows are swept on the way."""
    state = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(48)  # 64 characters, within RFC 7636's 43-128
    await db.execute(
        """WITH swept AS (DELETE FROM oauth_states WHERE expires_at < now())
           INSERT INTO oauth_states (state_hash, code_verifier, expires_at)
           VALUES ($1, $2, now() + make_interval(secs => $3::float8))""",
        _hash(state),
        verifier,
        ttl_s,
    )
    return state, verifier


async def take_state(db: asyncpg.Pool, state: str) -> str | None:
    """The verifier of a live state, consuming it; None if unknown, used or expired."""
    row = await db.fetchrow(
        "DELETE FROM oauth_states WHERE state_hash = $1 RETURNING code_verifier, expires_at > now() AS live",
        _hash(state),
    )
    if row is None or not row["live"]:
        return None
    verifier: str = row["code_verifier"]
    return verifier
