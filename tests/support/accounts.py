"""Accounts and keys made straight in Postgres for tests, with optional quota overrides."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

import asyncpg

from services.keys.store import create_account, create_key


@dataclass(frozen=True)
class TestAccount:
    __test__ = False  # a helper, not a test class

    account_id: int
    key_id: int
    key: str

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def subject(self) -> str:
        return f"a{self.account_id}"


async def make_account_async(
    database_url: str,
    *,
    requests_per_day: int | None = None,
    tokens_per_day: int | None = None,
    concurrent: int | None = None,
) -> TestAccount:
    conn = await asyncpg.connect(database_url)
    try:
        account_id = await create_account(conn, f"test-{secrets.token_hex(4)}")
        key, record = await create_key(conn, account_id, name="test")
        if any(v is not None for v in (requests_per_day, tokens_per_day, concurrent)):
            await conn.execute(
                "INSERT INTO account_quotas (account_id, requests_per_day, tokens_per_day, concurrent) "
                "VALUES ($1, $2, $3, $4)",
                account_id,
                requests_per_day,
                tokens_per_day,
                concurrent,
            )
        return TestAccount(account_id, record.key_id, key)
    finally:
        await conn.close()


def make_account(database_url: str, **quotas: int | None) -> TestAccount:
    return asyncio.run(make_account_async(database_url, **quotas))


async def fetch(database_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def query(database_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    return asyncio.run(fetch(database_url, sql, *args))
