"""A database of its own on the session's PostgreSQL, for tests whose tables must hold only their rows."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg

from infra.postgres import PostgresServer
from services.db.migrate import migrate


def fresh_database(postgres: PostgresServer, prefix: str, *, migrated: bool = True) -> str:
    """A new, empty database (migrated unless told not to); its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    postgres.psql(f"CREATE DATABASE {name}", database="postgres")
    url = f"{postgres.url.rsplit('/', 1)[0]}/{name}"
    if migrated:
        asyncio.run(_migrate(url))
    return url


async def _migrate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
