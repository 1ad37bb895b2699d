"""Real-process tests for the local launchers: no mocks, real nats-server and PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import asyncpg
import nats
import pytest

from infra.nats import NatsServer
from infra.postgres import PostgresAlreadyRunningError, PostgresServer


def _assert_gone(pid: int) -> None:
    # stop() has reaped the leader, so the pid no longer exists at all.
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _assert_port_free(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    # SO_REUSEADDR like any server, so TIME_WAIT leftovers don't count as "in use".
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


async def test_nats_round_trip_and_clean_stop(tmp_path: Path) -> None:
    server = NatsServer.start(tmp_path / "nats")
    try:
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert (tmp_path / "nats" / "nats.conf").is_file()
        nc = await nats.connect(server.url)
        try:
            assert nc.max_payload == 8 * 1024 * 1024
            sub = await nc.subscribe("infra.test")
            await nc.publish("infra.test", b"ping")
            msg = await sub.next_msg(timeout=5)
            assert msg.data == b"ping"
        finally:
            await nc.close()
        server.reload()  # SIGHUP on an unchanged config is accepted
        with pytest.raises(RuntimeError, match="rejected"):
            server.reload("this is { not valid")
        assert server.proc.poll() is None  # a rejected reload keeps the old config running
    finally:
        server.stop()
    assert server.proc.returncode is not None
    _assert_gone(server.proc.pid)
    _assert_port_free(server.port)
    server.stop()  # idempotent


async def test_postgres_data_survives_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    server = PostgresServer.start(data_dir, fast=True)
    try:
        assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/macprovider"
        conn = await asyncpg.connect(server.url)
        try:
            await conn.execute("CREATE TABLE secrets (id int PRIMARY KEY, value text NOT NULL)")
            await conn.execute("INSERT INTO secrets VALUES (1, 'sk-launcher-test')")
        finally:
            await conn.close()
        assert "sk-launcher-test" in server.dump()
    finally:
        server.stop()
    _assert_gone(server.proc.pid)
    _assert_port_free(server.port)

    # Same data dir, new port: no initdb, the database and its row are still there.
    again = PostgresServer.start(data_dir, fast=True)
    try:
        conn = await asyncpg.connect(again.url)
        try:
            assert await conn.fetchval("SELECT value FROM secrets WHERE id = 1") == "sk-launcher-test"
        finally:
            await conn.close()
    finally:
        again.stop()
    _assert_gone(again.proc.pid)


def test_postgres_refuses_running_dir_and_recovers_after_kill(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    server = PostgresServer.start(data_dir, fast=True)
    try:
        with pytest.raises(PostgresAlreadyRunningError, match="still running"):
            PostgresServer.start(data_dir, fast=True)
        assert server.proc.poll() is None
        # A crash leaves postmaster.pid behind; the next start must clear it.
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
    finally:
        server.stop()
    assert (data_dir / "postmaster.pid").exists()
    # Orphaned backends notice the postmaster is gone and exit on their own.
    deadline = time.monotonic() + 10
    again = None
    while again is None:
        try:
            again = PostgresServer.start(data_dir, fast=True)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with again:
        assert again.psql("SELECT 1").strip() == "1"
    assert again.proc.returncode is not None
