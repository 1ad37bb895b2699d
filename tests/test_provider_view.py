"""A provider's own view: `/provider/macs` for the owner and the Mac itself, `/provider` as a page,
and `mac-provider-daemon status` on the Mac, each answering "why am I getting no traffic?"."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest

from daemon.credentials import ProviderCredentials, save
from services.auth.sessions import create_session, session_cookie_name
from services.providers import tokens
from services.settings import Settings
from tests.support.accounts import TestAccount, make_account
from tests.support.stack import REPO, TINY_MODEL, TINY_PROVIDER, Stack


async def _sql(url: str, sql: str, *args: object) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def _mint(url: str, provider_id: str, account_id: int, name: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return await tokens.mint(conn, provider_id, account_id=account_id, name=name)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def owner(stack: Stack) -> tuple[TestAccount, str]:
    """An account that owns the stack's daemon (made its owner through a token, as device login does)."""
    account = make_account(stack.database_url)
    token = asyncio.run(_mint(stack.database_url, TINY_PROVIDER, account.account_id, "Tiny test Mac"))
    return account, token


def _macs(stack: Stack, headers: dict[str, str], path: str = "/provider/macs") -> httpx.Response:
    return httpx.get(f"{stack.base_url}{path}", headers=headers, timeout=10)


def test_the_owner_sees_each_mac_and_a_routable_one_has_nothing_holding_it_back(
    stack: Stack, owner: tuple[TestAccount, str]
) -> None:
    account, _ = owner
    pending, banned = f"pending-{account.account_id}", f"banned-{account.account_id}"
    asyncio.run(
        _sql(
            stack.database_url,
            "INSERT INTO providers (provider_id, account_id, name, status, note) VALUES "
            "($1, $3, 'New Mac', 'pending', ''), ($2, $3, 'Bad Mac', 'banned', 'sent garbage')",
            pending,
            banned,
            account.account_id,
        )
    )
    r = _macs(stack, account.auth())
    assert r.status_code == 200, r.text
    macs = {m["provider_id"]: m for m in r.json()["data"]}
    assert set(macs) == {TINY_PROVIDER, pending, banned}  # only this account's Macs
    tiny = macs[TINY_PROVIDER]
    assert tiny["name"] == "Tiny test Mac"
    assert tiny["online"] is True
    assert tiny["admission"] in ("provisional", "pinned")
    assert [(m["id"], m["routed"]) for m in tiny["models"]] == [(TINY_MODEL, True)]
    assert tiny["traffic"] == "routable"
    assert tiny["uptime_s"] > 0
    assert tiny["why_no_traffic"] == []
    assert macs[pending]["traffic"] == "not_routable"
    assert macs[pending]["why_no_traffic"][0].startswith("Pending admission")
    assert any(w.startswith("Offline: no heartbeat heard since never") for w in macs[pending]["why_no_traffic"])
    assert macs[banned]["why_no_traffic"][0] == "Banned by the operator: sent garbage."


def test_a_mac_sees_itself_only_and_strangers_see_nothing(stack: Stack, owner: tuple[TestAccount, str]) -> None:
    account, token = owner
    mine = {"Authorization": f"Bearer {token}"}
    r = _macs(stack, mine)
    assert [m["provider_id"] for m in r.json()["data"]] == [TINY_PROVIDER]
    assert _macs(stack, mine, f"/provider/macs/{TINY_PROVIDER}").json()["provider_id"] == TINY_PROVIDER
    other = _macs(stack, mine, f"/provider/macs/pending-{account.account_id}")
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "not_found"
    stranger = make_account(stack.database_url)
    assert _macs(stack, stranger.auth()).json()["data"] == []
    assert _macs(stack, stranger.auth(), f"/provider/macs/{TINY_PROVIDER}").status_code == 404
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    for headers, code in (
        ({}, "not_signed_in"),
        ({"Authorization": f"Bearer {forged}"}, "invalid_api_key"),
        ({"Authorization": "Bearer mpp_" + "x" * 36}, "invalid_api_key"),
    ):
        r = _macs(stack, headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == code


def test_the_page_shows_the_same_facts_to_the_signed_in_owner(stack: Stack, owner: tuple[TestAccount, str]) -> None:
    account, _ = owner

    async def session() -> str:
        conn = await asyncpg.connect(stack.database_url)
        try:
            return await create_session(conn, account.account_id, ttl_s=600)
        finally:
            await conn.close()

    settings = Settings.from_env({**os.environ, "DATABASE_URL": stack.database_url, "MP_PUBLIC_URL": stack.base_url})
    cookie = {session_cookie_name(settings): asyncio.run(session())}
    page = httpx.get(f"{stack.base_url}/provider", cookies=cookie, timeout=10)
    assert page.status_code == 200
    assert "Tiny test Mac" in page.text
    assert "Banned by the operator: sent garbage." in page.text
    assert "script" not in page.headers["content-security-policy"].replace("default-src 'none'", "")
    assert "not signed in" in httpx.get(f"{stack.base_url}/provider", timeout=10).text
    # The cookie alone is enough for the JSON too (a signed-in page may fetch it).
    assert len(httpx.get(f"{stack.base_url}/provider/macs", cookies=cookie, timeout=10).json()["data"]) >= 1


def test_the_daemon_status_command_shows_both_views(
    stack: Stack, owner: tuple[TestAccount, str], tmp_path: Path
) -> None:
    _, token = owner
    creds = tmp_path / "provider.json"
    save(creds, ProviderCredentials(TINY_PROVIDER, token, stack.nats.url, stack.base_url, "Tiny test Mac"))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MP_STATE_DIR": str(stack.home / "daemons" / TINY_PROVIDER),
        "MP_ADMIN_PORT": str(stack.daemon.admin_port),
        "MP_PROVIDER_CREDENTIALS": str(creds),
    }
    env.pop("MP_PROVIDER_ID", None)
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    both = json.loads(done.stdout)
    assert both["daemon"]["pool"]["provider_id"] == TINY_PROVIDER
    assert both["daemon"]["pool"]["connected"] is True
    assert both["pool"]["traffic"] == "routable"
    text = subprocess.run(
        [sys.executable, "-m", "daemon", "status"], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert "Tiny test Mac" in text
    # The suite routes uncatalogued models. The verdict shown is the last one a replica recorded: on a
    # worker where test_verified_models ran, its refusing replica recorded "not_in_catalog" for this Mac
    # too, and this stack's replica writes its own again only when something changes (or after 60 s).
    assert re.search(rf"{TINY_MODEL}: (uncatalogued|not_in_catalog), routed", text), text
    assert token not in done.stdout + text
    # Signed out (no credentials): it says what to do, and fails for scripts.
    creds.unlink()
    signed_out = subprocess.run(
        [sys.executable, "-m", "daemon", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert signed_out.returncode == 1
    assert "mac-provider-daemon login" in signed_out.stdout
