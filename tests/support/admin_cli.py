"""`mac-provider admin providers|models ...` as an operator runs it: a real process against the test's stack."""

from __future__ import annotations

import asyncio
import os
import sys


async def providers_cli(*args: str, nats_url: str, database_url: str) -> tuple[int, str]:
    """(exit code, what it printed)."""
    return await admin_cli("providers", *args, nats_url=nats_url, database_url=database_url)


async def models_cli(
    *args: str, nats_url: str, database_url: str, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """`mac-provider admin models ...`: (exit code, what it printed)."""
    return await admin_cli("models", *args, nats_url=nats_url, database_url=database_url, env=env)


async def admin_cli(*args: str, nats_url: str, database_url: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services",
        "admin",
        *args,
        env={**os.environ, "NATS_URL": nats_url, "DATABASE_URL": database_url, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()
