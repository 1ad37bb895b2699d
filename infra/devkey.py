"""The local stack's dev account and its one `mp_` key.

The key's plaintext lives only in `$MP_HOME/dev.env` on the developer's own
machine (that file exists to hand it to SDKs); Postgres holds its hash.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from schemas.private_file import write_private
from services.db.migrate import migrate
from services.keys import format as key_format
from services.keys.store import account_by_login, create_account, create_key, find_active_key

DEV_LOGIN = "dev"


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not name.startswith("#"):
                values[name.strip()] = value.strip()
    return values


async def ensure_dev_key(database_url: str, dev_env: Path) -> str:
    """Migrate, then reuse the key in dev.env if Postgres still knows it, else make one."""
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
        known = read_env_file(dev_env).get("OPENAI_API_KEY", "")
        if key_format.well_formed(known) and await find_active_key(conn, known) is not None:
            return known
        account_id = await account_by_login(conn, DEV_LOGIN) or await create_account(conn, DEV_LOGIN)
        key, _ = await create_key(conn, account_id, name="local dev key")
        return key
    finally:
        await conn.close()


def write_dev_env(dev_env: Path, *, base_url: str, key: str) -> None:
    dev_env.parent.mkdir(parents=True, exist_ok=True)
    write_private(
        dev_env,
        "# Written by `just up`. Load with: set -a; . .mp/dev.env; set +a\n"
        f"OPENAI_BASE_URL={base_url}\nOPENAI_API_KEY={key}\n",
    )
