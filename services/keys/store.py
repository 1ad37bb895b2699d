"""Accounts and API keys in Postgres. Plaintext keys never reach the database."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from services.keys import format as key_format


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: int
    account_id: int
    prefix: str


async def create_account(conn: asyncpg.Connection | asyncpg.Pool, login: str) -> int:
    account_id: int = await conn.fetchval("INSERT INTO accounts (login) VALUES ($1) RETURNING id", login)
    return account_id


async def account_by_login(conn: asyncpg.Connection | asyncpg.Pool, login: str) -> int | None:
    account_id: int | None = await conn.fetchval(
        "SELECT id FROM accounts WHERE login = $1 AND github_id IS NULL ORDER BY id LIMIT 1", login
    )
    return account_id


async def create_key(conn: asyncpg.Connection | asyncpg.Pool, account_id: int, name: str = "") -> tuple[str, KeyRecord]:
    """A new key: the plaintext (show it once) and its record."""
    key = key_format.generate()
    prefix = key_format.display_prefix(key)
    key_id: int = await conn.fetchval(
        "INSERT INTO api_keys (account_id, key_hash, prefix, name) VALUES ($1, $2, $3, $4) RETURNING id",
        account_id,
        key_format.digest(key),
        prefix,
        name,
    )
    return key, KeyRecord(key_id=key_id, account_id=account_id, prefix=prefix)


async def find_active_key(conn: asyncpg.Connection | asyncpg.Pool, key: str) -> KeyRecord | None:
    row = await conn.fetchrow(
        "SELECT id, account_id, prefix FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        key_format.digest(key),
    )
    if row is None:
        return None
    return KeyRecord(key_id=row["id"], account_id=row["account_id"], prefix=row["prefix"])
