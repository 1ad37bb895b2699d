"""The asyncpg pool every service shares."""

from __future__ import annotations

import asyncpg

from services.db.migrate import migrate


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a connection going back to the pool runs besides asyncpg's own clean-up: nothing.

    asyncpg's default sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`
    after every use, a second round trip for each statement on the hot path. Pool connections
    carry no session state here (LISTEN has connections of its own, advisory locks are
    transaction-scoped, nothing runs a session `SET`), and asyncpg still rolls back a
    transaction left open and drops listeners before calling this.
    """


async def open_pool(url: str, *, size: int, run_migrations: bool = True) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=size, command_timeout=30, reset=_keep_session)
    if run_migrations:
        async with pool.acquire() as conn:
            await migrate(conn)  # type: ignore[arg-type]
    return pool
