"""Accounts and API keys in Postgres. Plaintext keys never reach the database."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from services.keys import format as key_format

# A pool, a connection, or a pool's connection inside a transaction.
Db = asyncpg.Connection | asyncpg.Pool | PoolConnectionProxy


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: int
    account_id: int
    prefix: str


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What an account sees about one of its keys (never the key itself)."""

    key_id: int
    prefix: str
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class GitHubAccount:
    account_id: int
    login: str
    created: bool


def _info(row: asyncpg.Record) -> KeyInfo:
    return KeyInfo(
        key_id=row["id"],
        prefix=row["prefix"],
        name=row["name"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


async def create_account(conn: Db, login: str) -> int:
    account_id: int = await conn.fetchval("INSERT INTO accounts (login) VALUES ($1) RETURNING id", login)
    return account_id


async def account_by_login(conn: Db, login: str) -> int | None:
    account_id: int | None = await conn.fetchval(
        "SELECT id FROM accounts WHERE login = $1 AND github_id IS NULL ORDER BY id LIMIT 1", login
    )
    return account_id


async def account_login(conn: Db, account_id: int) -> str | None:
    login: str | None = await conn.fetchval("SELECT login FROM accounts WHERE id = $1", account_id)
    return login


async def upsert_github_account(conn: Db, github_id: int, login: str) -> GitHubAccount:
    """The account of a GitHub user, made on first sign-in; a renamed GitHub login is followed."""
    row = await conn.fetchrow(
        """INSERT INTO accounts (login, github_id) VALUES ($1, $2)
           ON CONFLICT (github_id) DO UPDATE SET login = EXCLUDED.login
           RETURNING id, (xmax = 0) AS created""",
        login,
        github_id,
    )
    assert row is not None
    return GitHubAccount(account_id=row["id"], login=login, created=row["created"])


async def create_key(conn: Db, account_id: int, name: str = "") -> tuple[str, KeyRecord]:
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


async def find_active_key(conn: Db, key: str) -> KeyRecord | None:
    return await find_active_digest(conn, key_format.digest(key))


async def find_active_digest(conn: Db, key_hash: bytes) -> KeyRecord | None:
    # An equality match on a unique index of SHA-256 digests: the digest of a guess
    # tells nothing about the digests near it, so there is no timing oracle to exploit.
    row = await conn.fetchrow(
        "SELECT id, account_id, prefix FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", key_hash
    )
    if row is None:
        return None
    return KeyRecord(key_id=row["id"], account_id=row["account_id"], prefix=row["prefix"])


async def list_keys(conn: Db, account_id: int) -> list[KeyInfo]:
    rows = await conn.fetch(
        """SELECT id, prefix, name, created_at, last_used_at, revoked_at FROM api_keys
           WHERE account_id = $1 ORDER BY created_at DESC, id DESC""",
        account_id,
    )
    return [_info(r) for r in rows]


async def get_key(conn: Db, account_id: int, key_id: int) -> KeyInfo | None:
    row = await conn.fetchrow(
        """SELECT id, prefix, name, created_at, last_used_at, revoked_at FROM api_keys
           WHERE id = $1 AND account_id = $2""",
        key_id,
        account_id,
    )
    return None if row is None else _info(row)


async def revoke_key(conn: Db, account_id: int, key_id: int) -> KeyInfo | None:
    """Revoke one of the account's keys (a no-op if already revoked); None if it has no such key."""
    row = await conn.fetchrow(
        """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
           WHERE id = $1 AND account_id = $2
           RETURNING id, prefix, name, created_at, last_used_at, revoked_at""",
        key_id,
        account_id,
    )
    return None if row is None else _info(row)


async def record_last_used(conn: Db, used: dict[int, datetime]) -> None:
    """One statement for a batch of keys; never moves a time backwards."""
    await conn.execute(
        """UPDATE api_keys AS k SET last_used_at = greatest(k.last_used_at, u.at)
           FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, at) WHERE k.id = u.id""",
        list(used),
        list(used.values()),
    )
