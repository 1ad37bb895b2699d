"""Sign-ins in flight: an unguessable single-use `state` and its PKCE verifier, in Postgres.

Any replica may serve the callback. Only the state's SHA-256 is stored (the
browser holds the value). Taking a state deletes it, so it works once.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import asyncpg


def _hash(state: str) -> bytes:
    return hashlib.sha256(state.encode()).digest()


@dataclass(frozen=True, slots=True)
class TakenState:
    code_verifier: str
    # The page to come back to (services/auth/return_path.py), if the sign-in was started from one.
    return_to: str | None


async def open_state(db: asyncpg.Pool, *, ttl_s: float, return_to: str | None = None) -> tuple[str, str]:
    """A new (state, code_verifier) pair; expired rows are swept on the way."""
    state = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(48)  # 64 characters, within RFC 7636's 43-128
    await db.execute(
        """WITH swept AS (DELETE FROM oauth_states WHERE expires_at < now())
           INSERT INTO oauth_states (state_hash, code_verifier, expires_at, return_to)
           VALUES ($1, $2, now() + make_interval(secs => $3::float8), $4)""",
        _hash(state),
        verifier,
        ttl_s,
        return_to,
    )
    return state, verifier


async def take_state(db: asyncpg.Pool, state: str) -> TakenState | None:
    """The verifier (and return page) of a live state, consuming it; None if unknown, used or expired."""
    row = await db.fetchrow(
        """DELETE FROM oauth_states WHERE state_hash = $1
           RETURNING code_verifier, return_to, expires_at > now() AS live""",
        _hash(state),
    )
    if row is None or not row["live"]:
        return None
    return TakenState(row["code_verifier"], row["return_to"])
