"""Provider tokens (`mpp_`) in a real Postgres: made, checked, owned, revoked (with a notice)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from infra.postgres import PostgresServer
from services.keys import format as key_format
from services.keys.store import create_account
from services.providers import tokens
from tests.support.databases import fresh_database


@pytest.fixture(scope="module")
def tokens_db(postgres: PostgresServer) -> str:
    return fresh_database(postgres, "mp_provider_tokens")


@pytest.fixture
async def db(tokens_db: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(tokens_db, min_size=2, max_size=2)
    yield pool
    await pool.close()


async def test_a_token_speaks_for_its_provider_until_revoked(db: asyncpg.Pool, tokens_db: str) -> None:
    owner = await create_account(db, "mac-owner")
    pid = tokens.new_provider_id()
    token = await tokens.mint(db, pid, account_id=owner, name="Studio")
    assert key_format.PROVIDER_TOKENS.well_formed(token)
    assert not key_format.well_formed(token)
    found = await tokens.owner_of(db, token)
    assert found is not None
    assert (found.provider_id, found.account_id, found.status) == (pid, owner, "pending")
    # Only the hash is stored; a flipped character or an `mp_` key never matches.
    assert await db.fetchval("SELECT count(*) FROM provider_tokens WHERE token_hash = $1", token.encode()) == 0
    assert await tokens.owner_of(db, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert await tokens.owner_of(db, key_format.generate()) is None

    listener = await asyncpg.connect(tokens_db)
    notices: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(tokens.REVOKED_CHANNEL, lambda *args: notices.put_nowait(args[-1]))
    try:
        other = await create_account(db, "someone-else")
        assert await tokens.revoke(db, found.token_id, account_id=other) is None  # not theirs
        assert await tokens.owner_of(db, token) is not None
        assert await tokens.revoke(db, found.token_id, account_id=owner) == pid
        notice = json.loads(await asyncio.wait_for(notices.get(), 5))
        assert notice == {"id": found.token_id, "provider_id": pid}
        assert await tokens.owner_of(db, token) is None
        assert await tokens.revoke(db, found.token_id) is None  # already revoked: no second notice
    finally:
        await listener.close()


async def test_one_owners_mac_never_gets_a_token_for_another_account(db: asyncpg.Pool) -> None:
    alice, mallory = await create_account(db, "alice"), await create_account(db, "mallory")
    pid = tokens.new_provider_id()
    await tokens.mint(db, pid, account_id=alice, name="Alice's mini")
    with pytest.raises(PermissionError):
        await tokens.mint(db, pid, account_id=mallory, name="mine now")
    row = await db.fetchrow("SELECT account_id, name FROM providers WHERE provider_id = $1", pid)
    assert row is not None
    assert (row["account_id"], row["name"]) == (alice, "Alice's mini")
    # The operator may add one (an unattended setup); the owner stays.
    assert key_format.PROVIDER_TOKENS.well_formed(await tokens.mint(db, pid))
    assert len(await tokens.list_tokens(db, provider_id=pid)) == 2
    assert [t.provider_id for t in await tokens.list_tokens(db, account_id=alice)] == [pid]
    assert await tokens.revoke_provider(db, pid) == 2
