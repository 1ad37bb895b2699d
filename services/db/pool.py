"""The asyncpg pool every service shares."""

from __future__ import annotations

import asyncpg

from services.db.migrate import migrate


async def open_pool(url: str, *, size: int, run_migrations: bool = True) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=size, command_timeout=30)
    if run_migrations:
        async with pool.acquire() as conn:
            await migrate(conn)  # type: ignore[arg-type]
    return pool
