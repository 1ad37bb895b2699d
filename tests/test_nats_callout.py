"""The NATS auth callout end to end (real nats-server, real Postgres, the natsauth service as its own process):
revoked tokens and banned providers are refused, disconnected at once and kept out; hostile credentials
are refused without the service falling over."""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from nats.aio.client import Client as Nats

from infra.components import start_natsauth
from infra.nats_auth import SecuredNats
from infra.ports import free_port
from infra.postgres import PostgresServer
from services.keys.format import PROVIDER_TOKENS
from services.natsauth.claims import ConnectOptions
from services.natsauth.decide import Authorizer, Refusal
from services.providers import store, tokens


def _pid(name: str) -> str:
    return f"callout-{name}-{os.getpid()}-{time.monotonic_ns() % 10**6}"


async def _refused(server: SecuredNats, **login: Any) -> str:
    try:
        nc = await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5, **login)
    except Exception as exc:  # an oversized CONNECT is refused before the callout, with another error
        return str(exc)
    await nc.close()
    raise AssertionError(f"let in with {sorted(login)}")


@dataclass
class Watched:
    """A connection that reconnects as a daemon does, and notes when it lost the server and why it stays out."""

    nc: Nats
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    lost_at: float = 0.0
    back: asyncio.Event = field(default_factory=asyncio.Event)
    errors: list[str] = field(default_factory=list)


@asynccontextmanager
async def _watched(server: SecuredNats, **login: Any) -> AsyncIterator[Watched]:
    box: dict[str, Watched] = {}

    async def disconnected() -> None:
        w = box["w"]
        if not w.lost.is_set():
            w.lost_at = time.perf_counter()
            w.lost.set()

    async def error(exc: Exception) -> None:
        box["w"].errors.append(str(exc).lower())

    async def reconnected() -> None:
        box["w"].back.set()

    nc = await nats.connect(
        server.url,
        reconnect_time_wait=0.1,
        max_reconnect_attempts=-1,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
        **login,
    )
    box["w"] = Watched(nc)
    try:
        yield box["w"]
    finally:
        await nc.close()


async def _db(server: SecuredNats) -> asyncpg.Connection:
    assert server.database_url is not None
    return await asyncpg.connect(server.database_url)


@pytest.mark.parametrize("how", ["token revoked", "provider banned", "provider suspended"])
async def test_a_shut_out_provider_cannot_connect(nats_server: SecuredNats, how: str) -> None:
    pid = _pid("shut")
    token = nats_server.provider_token(pid)
    ok = await nats.connect(nats_server.url, token=token, allow_reconnect=False)
    await ok.close()
    conn = await _db(nats_server)
    try:
        if how == "token revoked":
            assert await tokens.revoke_provider(conn, pid) == 1
        else:
            await store.set_status(conn, pid, how.split()[-1], "test")
    finally:
        await conn.close()
    assert "authorization violation" in (await _refused(nats_server, token=token)).lower()


@pytest.mark.parametrize("how", ["token revoked", "provider banned"])
async def test_a_connected_provider_is_disconnected_within_a_second_and_kept_out(
    nats_server: SecuredNats, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pid, bystander = _pid("kick"), _pid("bystander")
    token = nats_server.provider_token(pid)
    gateway = nats_server.gateway
    async with (
        _watched(nats_server, token=token) as victim,
        _watched(nats_server, token=nats_server.provider_token(bystander)) as other,
        _watched(nats_server, user=gateway.user, password=gateway.password) as control,
    ):
        conn = await _db(nats_server)
        try:
            started = time.perf_counter()
            if how == "token revoked":
                await tokens.revoke_provider(conn, pid)
            else:
                await store.set_status(conn, pid, "banned", "test")
        finally:
            await conn.close()
        await asyncio.wait_for(victim.lost.wait(), timeout=1.0)
        took_ms = (victim.lost_at - started) * 1000
        with capsys.disabled():
            print(f"\n[figure] {how} -> provider disconnected in {took_ms:.0f} ms")
        # It keeps trying, as a daemon does; every attempt meets the callout and is refused.
        await asyncio.sleep(1.0)
        assert not victim.nc.is_connected
        assert any("authorization violation" in e for e in victim.errors), victim.errors
        # Only that provider: another provider and the control plane never noticed.
        assert other.nc.is_connected
        assert not other.lost.is_set()
        assert control.nc.is_connected
        assert not control.lost.is_set()
    assert "authorization violation" in (await _refused(nats_server, token=token)).lower()


async def test_a_revocation_missed_while_the_callout_was_not_listening_still_disconnects(
    nats_server: SecuredNats,
) -> None:
    """The callout's LISTEN connection drops just before a revocation commits: its notice is lost, and
    the check the callout makes of every provider connection when it listens again closes this one."""
    pid = _pid("missed")
    token = nats_server.provider_token(pid)
    async with _watched(nats_server, token=token) as victim:
        conn = await _db(nats_server)
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'mp-natsauth-%'"
                )
                await tokens.revoke_provider(conn, pid)
        finally:
            await conn.close()
        await asyncio.wait_for(victim.lost.wait(), timeout=10.0)
        await asyncio.sleep(0.5)
        assert not victim.nc.is_connected


async def test_hostile_credentials_are_refused_and_the_callout_keeps_answering(
    nats_server: SecuredNats, state_dir: Path
) -> None:
    valid = nats_server.provider_token(_pid("after"))
    hostile: list[dict[str, Any]] = [
        {"token": "mpp_" + "A" * 36},  # the right shape, a wrong checksum
        {"token": PROVIDER_TOKENS.generate()},  # well formed, never minted
        {"token": os.urandom(24).hex()},
        {"token": 'mpp_\u00e9\u0000"}{\\' + "x" * 30},
        {"token": "t" * 3000},  # a long one still fits the CONNECT line: the callout sees and refuses it
        {"token": "t" * 200_000},  # past the server's control line: refused before any callout
        {"user": "gateway", "password": "p" * 3000},
        {"user": "\u0000" * 50, "password": ""},
        {"token": valid[:-1]},  # a real token, truncated
    ]
    for login in hostile:
        await _refused(nats_server, **login)
    # Every replica still answers, and at once.
    for _ in range(4):
        nc = await nats.connect(nats_server.url, token=valid, allow_reconnect=False, connect_timeout=2)
        await nc.close()
    log = (state_dir / "logs" / "natsauth.log").read_text()
    assert "nats_login_failed" not in log
    assert "Traceback" not in log
    assert valid not in log, "credentials are never logged"
    assert "t" * 100 not in log


async def test_callout_latency_connect_to_authorised(
    nats_server: SecuredNats, capsys: pytest.CaptureFixture[str]
) -> None:
    """The figure: from opening a connection to the server's OK (TCP, INFO, CONNECT, the callout, PONG)."""
    token = nats_server.provider_token(_pid("latency"))
    gateway = nats_server.gateway
    figures: dict[str, list[float]] = {"provider token": [], "control plane": []}
    for _ in range(30):
        for kind, login in (
            ("provider token", {"token": token}),
            ("control plane", {"user": gateway.user, "password": gateway.password}),
        ):
            started = time.perf_counter()
            nc = await nats.connect(nats_server.url, allow_reconnect=False, **login)
            figures[kind].append((time.perf_counter() - started) * 1000)
            await nc.close()
    with capsys.disabled():
        for kind, ms in figures.items():
            ms.sort()
            print(
                f"\n[figure] callout connect->authorised ({kind}, n={len(ms)}): "
                f"median {statistics.median(ms):.1f} ms, p90 {ms[int(len(ms) * 0.9)]:.1f} ms"
            )
    assert statistics.median(figures["provider token"]) < 250, "a login is a few milliseconds, not a timeout"


def test_the_callout_alone_refuses_to_start_without_its_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MP_NATS_")}
    done = subprocess.run(
        [sys.executable, "-m", "services", "serve", "--service", "natsauth"],
        env={**env, "MP_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "MP_NATS_ISSUER_SEED" in done.stderr


async def test_any_node_of_a_cluster_calls_out_and_a_revocation_reaches_every_node(
    tmp_path: Path, postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two nodes, the callout service logged in to the first only: a provider on the second is let in
    (its request crosses the route) and closed there when its token is revoked; one whose revocation
    sent no notice at all is closed by the periodic re-check."""
    routes = [free_port(), free_port()]

    def cluster(i: int) -> str:
        # Every server runs JetStream (infra/nats.py), which in a cluster needs a name per node.
        return (
            f"server_name: mp-test-{i}\n"
            f"cluster {{ name: mp-test, listen: 127.0.0.1:{routes[i]}, "
            f"routes: [nats-route://127.0.0.1:{routes[1 - i]}] }}"
        )

    first = SecuredNats.start(tmp_path / "a", database_url=postgres.url, extra_config=cluster(0))
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "credentials.json", tmp_path / "b" / "credentials.json")
    second = SecuredNats.start(tmp_path / "b", database_url=postgres.url, extra_config=cluster(1))
    callout = start_natsauth(tmp_path, nats=first, database_url=postgres.url, env={"MP_NATS_RECHECK_S": "1"})
    try:
        pid = _pid("cluster")
        token = first.provider_token(pid)
        deadline = time.monotonic() + 10
        while True:  # until the route is up and the callout's interest has crossed it
            try:
                started = time.perf_counter()
                nc = await nats.connect(second.url, token=token, allow_reconnect=False, connect_timeout=3)
                took_ms = (time.perf_counter() - started) * 1000
                await nc.close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        with capsys.disabled():
            print(f"\n[figure] callout connect->authorised on the other node of a cluster: {took_ms:.1f} ms")
        silent = _pid("silent")
        silent_token = first.provider_token(silent)
        async with _watched(second, token=token) as victim, _watched(second, token=silent_token) as unnoticed:
            conn = await asyncpg.connect(postgres.url)
            try:
                # As a tool writing around the trigger would: no notice leaves.
                async with conn.transaction():
                    await conn.execute("ALTER TABLE provider_tokens DISABLE TRIGGER provider_tokens_revoked")
                    await tokens.revoke_provider(conn, silent)
                    await conn.execute("ALTER TABLE provider_tokens ENABLE TRIGGER provider_tokens_revoked")
            finally:
                await conn.close()
            await asyncio.wait_for(unnoticed.lost.wait(), timeout=3.0)
            conn = await asyncpg.connect(postgres.url)
            try:
                started = time.perf_counter()
                await tokens.revoke_provider(conn, pid)
            finally:
                await conn.close()
            await asyncio.wait_for(victim.lost.wait(), timeout=1.0)
            with capsys.disabled():
                took_ms = (victim.lost_at - started) * 1000
                print(f"[figure] revocation -> disconnect on the other node: {took_ms:.0f} ms")
            await asyncio.sleep(0.5)
            assert not victim.nc.is_connected
        assert "authorization violation" in (await _refused(second, token=token)).lower()
    finally:
        callout.stop()
        second.stop()
        first.stop()


async def test_invented_tokens_past_an_address_budget_are_refused_unread(nats_server: SecuredNats) -> None:
    # Token checksums are public: a stranger can invent well-formed tokens, each worth a Postgres query.
    conn = await _db(nats_server)
    try:
        good = await tokens.mint(conn, _pid("budget"))
        other = await tokens.mint(conn, _pid("budget-new"))
        authorizer = Authorizer(conn, control_user="", control_password="", failed_per_min=3)  # type: ignore[arg-type]

        async def login(token: str, client: str) -> str:
            decision = await authorizer.decide(ConnectOptions(auth_token=token), client)
            return decision.reason if isinstance(decision, Refusal) else "granted"

        flood, elsewhere = "203.0.113.9", "198.51.100.7"
        assert await login(good, flood) == "granted"  # this Mac logged in from there before the flood
        for _ in range(3):
            assert await login(PROVIDER_TOKENS.generate(), flood) == "unknown or revoked provider token"
        # Spent: new tokens from that address are refused without a query, a real one included ...
        assert (await login(PROVIDER_TOKENS.generate(), flood)).startswith("too many failed logins")
        assert (await login(other, flood)).startswith("too many failed logins")
        # ... but not a Mac that logged in lately, nor anyone elsewhere.
        assert await login(good, flood) == "granted"
        assert await login(other, elsewhere) == "granted"
        assert await login(PROVIDER_TOKENS.generate(), elsewhere) == "unknown or revoked provider token"
    finally:
        await conn.close()
