"""Who is calling: `Authorization: Bearer mp_...` checked against Postgres."""

from __future__ import annotations

from typing import Any

import asyncpg
from litestar import Request

from services.errors import InvalidApiKey, MissingBearerToken
from services.keys import format as key_format
from services.keys.store import KeyRecord, find_active_key

# Far above any real key; longer values are refused before any parsing work.
MAX_AUTHORIZATION_BYTES = 8192


def bearer_token(request: Request[Any, Any, Any]) -> str:
    raw = request.headers.get("authorization")
    if raw is None or not raw.strip():
        raise MissingBearerToken("Missing bearer token: add the header 'Authorization: Bearer mp_...'.")
    if len(raw) > MAX_AUTHORIZATION_BYTES:
        raise InvalidApiKey("Invalid API key: the Authorization header is too long.")
    scheme, _, token = raw.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise MissingBearerToken("Missing bearer token: the Authorization header must be 'Bearer mp_...'.")
    return token.strip()


async def authenticate(request: Request[Any, Any, Any], db: asyncpg.Pool) -> KeyRecord:
    token = bearer_token(request)
    # The checksum rejects typos and garbage (SQL, control characters) without touching the database.
    if not key_format.well_formed(token):
        raise InvalidApiKey("Invalid API key: it is not a well-formed mp_ key. Check that it was copied whole.")
    record = await find_active_key(db, token)
    if record is None:
        raise InvalidApiKey("Invalid API key: unknown or revoked.")
    return record
