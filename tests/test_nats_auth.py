"""NATS vouches for who is talking: a provider's token reaches only its own subjects (real nats-server,
its auth callout answered by the control plane's natsauth service)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import nats.js.api
import nats.js.errors
import pytest
from nats.aio.client import Client as Nats

from infra.components import start_natsauth
from infra.nats import JETSTREAM_DIR
from infra.nats_auth import Credentials, SecuredNats
from infra.postgres import PostgresServer
from schemas import bus, subjects
from services.keys.format import PROVIDER_TOKENS
from services.natsauth import server_config
from tests.support.ledger import ensure_usage_stream

MINE = "auth-mac-mine"
OTHER = "auth-mac-other"


@asynccontextmanager
async def _connect(server: SecuredNats, credentials: Credentials | str, errors: list[str]) -> AsyncIterator[Nats]:
    """As the control plane (its Credentials) or as a provider (its token)."""

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    login: dict[str, Any] = (
        {"token": credentials}
        if isinstance(credentials, str)
        # The control plane connects as services/runtime.py does: its own inbox, the only one it may read.
        else {"user": credentials.user, "password": credentials.password, "inbox_prefix": subjects.CONTROL_INBOX_PREFIX}
    )
    nc = await nats.connect(server.url, error_cb=on_error, allow_reconnect=False, **login)
    try:
        yield nc
    finally:
        await nc.close()


async def _violations(errors: list[str], expected: int) -> list[str]:
    # The server answers a refused SUB or PUB asynchronously with -ERR (nats-py lowercases its text).
    for _ in range(50):
        if len(errors) >= expected:
            break
        await asyncio.sleep(0.02)
    return [e for e in errors if "permissions violation" in e.lower()]


async def test_a_provider_cannot_read_or_write_as_anyone_else(nats_server: SecuredNats) -> None:
    mine = nats_server.provider_token(MINE)
    errors: list[str] = []
    async with _connect(nats_server, mine, errors) as nc:
        for subject in (
            subjects.work(OTHER),
            subjects.cancel(OTHER),
            subjects.notices(OTHER),
            subjects.ALL_REPLIES,
            "_INBOX.>",
            ">",
        ):
            await nc.subscribe(subject)
        await nc.subscribe(subjects.HEARTBEATS)  # reading the pool's heartbeats is the gateway's business
        await nc.publish(subjects.heartbeat(OTHER), b"spoof")
        await nc.publish(subjects.reply(OTHER, "gw-1", "req-1"), b"spoof")
        await nc.publish(subjects.work(OTHER), b"work")
        await nc.publish(subjects.work(MINE), b"work")
        await nc.publish(subjects.drain(OTHER), b"drain")
        await nc.publish(subjects.PROBE, b"probe")
        await nc.publish(subjects.notices(MINE), b"a verdict of my own making")
        await nc.flush()
        refused = await _violations(errors, 14)
        assert nc.is_connected, "a refused subject is an error, not a disconnect"
    assert len(refused) == 14, errors
    for subject in (
        subjects.work(OTHER),
        subjects.cancel(OTHER),
        subjects.notices(OTHER),
        subjects.ALL_REPLIES,
        "_INBOX.>",
    ):
        assert any(f'subscription to "{subject.lower()}"' in e for e in refused), (subject, refused)

    for subject in (
        subjects.heartbeat(OTHER),
        subjects.reply(OTHER, "gw-1", "req-1"),
        subjects.work(MINE),
        subjects.notices(MINE),
    ):
        assert any(f'publish to "{subject.lower()}"' in e for e in refused), (subject, refused)


async def test_refused_subjects_deliver_nothing_and_own_subjects_work(nats_server: SecuredNats) -> None:
    mine = nats_server.provider_token(MINE)
    errors: list[str] = []
    got: dict[str, list[Any]] = {"stolen": [], "work": [], "beats": [], "replies": []}
    async with (
        _connect(nats_server, mine, errors) as provider,
        _connect(nats_server, nats_server.gateway, []) as gateway,
    ):

        def sink(name: str) -> Any:
            async def cb(msg: Any) -> None:
                got[name].append(msg.subject)

            return cb

        await provider.subscribe(subjects.work(OTHER), cb=sink("stolen"))
        await provider.subscribe(subjects.ALL_REPLIES, cb=sink("stolen"))
        await provider.subscribe(subjects.work(MINE), cb=sink("work"))
        await gateway.subscribe(subjects.heartbeat(MINE), cb=sink("beats"))
        await gateway.subscribe(subjects.replies_for_gateway("gw-auth"), cb=sink("replies"))
        await provider.flush()
        await gateway.flush()
        await gateway.publish(subjects.work(OTHER), b"not for you")
        await gateway.publish(subjects.reply(OTHER, "gw-auth", "r1"), b"forged")  # refused: not even gateways
        await gateway.publish(subjects.work(MINE), b"yours", reply=subjects.reply(MINE, "gw-auth", "r2"))
        await gateway.flush()
        hb = bus.Heartbeat(MINE, "0", "boot", [], 1, 1, 0, 0, 0.0, 1.0, 0)
        await provider.publish(subjects.heartbeat(MINE), bus.encode(hb))
        await provider.publish(subjects.reply(MINE, "gw-auth", "r2"), b"frame")
        await provider.publish(subjects.heartbeat(OTHER), b"spoof")  # refused: never reaches the gateway
        await provider.flush()
        for _ in range(50):
            if got["work"] and got["beats"] and got["replies"]:
                break
            await asyncio.sleep(0.02)
    assert got["stolen"] == []
    assert got["work"] == [subjects.work(MINE)]
    assert got["beats"] == [subjects.heartbeat(MINE)]
    # Only a provider can answer on its own reply prefix: nothing forged reached the gateway.
    assert got["replies"] == [subjects.reply(MINE, "gw-auth", "r2")]


@pytest.mark.parametrize(
    "who",
    [
        "wrong password",
        "no credentials",
        "unknown user",
        "the control plane's password as a token",
        "a token never minted",
        "another provider's token, one character changed",
    ],
)
async def test_bad_credentials_are_refused(nats_server: SecuredNats, who: str) -> None:
    gateway, other = nats_server.gateway, nats_server.provider_token(OTHER)
    changed = other[:-7] + ("A" if other[-7] != "A" else "B") + other[-6:]
    login = {
        "wrong password": {"user": gateway.user, "password": gateway.password + "x"},
        "no credentials": {},
        "unknown user": {"user": "provider-nobody", "password": gateway.password},
        "the control plane's password as a token": {"token": gateway.password},
        "a token never minted": {"token": PROVIDER_TOKENS.generate()},
        "another provider's token, one character changed": {"token": changed},
    }[who]
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(nats_server.url, allow_reconnect=False, max_reconnect_attempts=0, **login)


def test_secrets_stay_private_and_the_config_holds_no_provider_and_no_secret(nats_server: SecuredNats) -> None:
    mine = nats_server.provider_token(MINE)
    state = nats_server.state_dir
    for name in ("credentials.json", "auth.conf"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    conf = (state / "auth.conf").read_text() + (state / "nats.conf").read_text()
    assert "auth_callout" in conf
    for secret in (mine, nats_server.gateway.password, nats_server.bus.issuer_seed, nats_server.bus.xkey_seed):
        assert secret not in conf
    assert MINE not in conf, "no provider is a user of the server"
    assert "provider" not in conf
    assert nats_server.gateway.user not in conf, "the control plane is let in by the callout too"
    assert conf.count('"$2b$') == 2  # the callout's and the system account's logins, bcrypt
    assert mine not in repr(nats_server.bus)
    assert nats_server.bus.issuer_seed not in repr(nats_server.bus)
    # The same provider keeps its token (it is minted once).
    assert nats_server.provider_token(MINE) == mine


async def test_a_daemon_started_for_a_new_id_gets_its_own_token(nats_server: SecuredNats) -> None:
    from infra.nats_auth import child_env

    env = child_env(nats_server, provider_id="auth-mac-new")
    assert env["NATS_URL"] == nats_server.url, "never the control plane's credentials"
    assert "MP_NATS_PASSWORD" not in env
    assert "MP_NATS_ISSUER_SEED" not in env
    errors: list[str] = []
    async with _connect(nats_server, env["MP_PROVIDER_TOKEN"], errors) as nc:
        await nc.subscribe(subjects.work("auth-mac-new"))
        await nc.subscribe(subjects.drain("auth-mac-new"))
        await nc.subscribe(subjects.work(MINE))
        await nc.flush()
        refused = await _violations(errors, 1)
    assert len(refused) == 1
    assert subjects.work(MINE) in refused[0]


async def test_a_restarted_server_lets_everyone_back(tmp_path: Path, postgres: PostgresServer) -> None:
    server = SecuredNats.start(tmp_path / "nats", database_url=postgres.url)
    callout = start_natsauth(tmp_path, nats=server, database_url=postgres.url)
    mine = server.provider_token(MINE)
    conns: list[Nats] = []
    back = [asyncio.Event(), asyncio.Event()]
    try:
        logins: list[dict[str, Any]] = [
            {"user": server.gateway.user, "password": server.gateway.password},
            {"token": mine},
        ]
        for login, event in zip(logins, back, strict=True):

            async def reconnected(event: asyncio.Event = event) -> None:
                event.set()

            conns.append(
                await nats.connect(
                    server.url,
                    reconnect_time_wait=0.1,
                    max_reconnect_attempts=-1,
                    reconnected_cb=reconnected,
                    **login,
                )
            )
        gateway, provider = conns
        work = await provider.subscribe(subjects.work(MINE))
        await provider.flush()
        server.restart()
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in back)), timeout=10)
        await provider.flush()  # its subscription is back on the new server
        await gateway.publish(subjects.work(MINE), b"after the restart")
        assert (await work.next_msg(timeout=5)).data == b"after the restart"
    finally:
        for c in conns:
            await c.close()
        callout.stop()
        server.stop()


def test_credentials_ride_in_a_url_and_come_out_intact() -> None:
    from infra.nats_auth import split_credentials

    creds = Credentials("provider-x", "p@ss:w/rd?")
    url = creds.in_url("nats://127.0.0.1:4222")
    assert split_credentials(url) == ("nats://127.0.0.1:4222", creds)
    assert split_credentials("nats://127.0.0.1:4222") == ("nats://127.0.0.1:4222", None)
    assert "p@ss" not in repr(creds)


def test_the_daemon_doctor_logs_in_as_its_provider(nats_server: SecuredNats) -> None:
    import subprocess
    import sys

    mine = nats_server.provider_token(MINE)

    def pool_check(token: str) -> dict[str, str]:
        env = {
            **os.environ,
            "NATS_URL": nats_server.url,
            "MP_PROVIDER_ID": MINE,
            "MP_PROVIDER_TOKEN": token,
            "MP_ADMIN_PORT": "0",
            "MP_API_PORT": "0",
        }
        done = subprocess.run(
            [sys.executable, "-m", "daemon", "doctor", "--json"], env=env, capture_output=True, text=True, timeout=60
        )
        checks = {c["name"]: c for c in json.loads(done.stdout)}
        return dict(checks["pool"])

    assert pool_check(mine)["status"] == "ok"
    refused = pool_check(PROVIDER_TOKENS.generate())
    assert refused["status"] == "fail"
    assert "refused this provider's credentials" in refused["detail"]
    assert "MP_PROVIDER_TOKEN" in refused["fix"]


# ---- JetStream: the usage-event stream is the control plane's, and only that stream ----------------

JS_GATEWAY = "gw-js-auth"


async def _usage_stream(js: Any) -> nats.js.api.StreamInfo:
    """Create MP_USAGE as the ledger does; a gateway of this session may have made it first (same name,
    perhaps its own settings: the server then says so, which still proves the request was let through)."""
    await ensure_usage_stream(js)
    info: nats.js.api.StreamInfo = await js.stream_info(subjects.USAGE_STREAM)
    return info


async def test_the_control_plane_runs_the_usage_stream_and_pulls_its_own_events(nats_server: SecuredNats) -> None:
    errors: list[str] = []
    async with _connect(nats_server, nats_server.gateway, errors) as nc:
        js = nc.jetstream(timeout=5)
        info = await _usage_stream(js)
        assert info.config.retention == nats.js.api.RetentionPolicy.WORK_QUEUE
        assert info.config.storage == nats.js.api.StorageType.FILE
        assert info.config.subjects == [subjects.ALL_USAGE_EVENTS]

        # The consumer first: a gateway of this session adopts events whose replica has no consumer.
        durable = subjects.usage_consumer(JS_GATEWAY)
        sub = await js.pull_subscribe(subjects.usage_events(JS_GATEWAY), durable=durable, stream=subjects.USAGE_STREAM)

        event_id = f"evt-{os.urandom(6).hex()}"
        first = await js.publish(subjects.usage_events(JS_GATEWAY), b"usage", headers={"Nats-Msg-Id": event_id})
        again = await js.publish(subjects.usage_events(JS_GATEWAY), b"usage", headers={"Nats-Msg-Id": event_id})
        assert first.stream == subjects.USAGE_STREAM
        assert not first.duplicate
        assert again.duplicate, "a retried event is stored once"
        assert again.seq == first.seq

        msgs = await sub.fetch(10, timeout=2)
        assert [(m.subject, m.data, m.headers and m.headers.get("Nats-Msg-Id")) for m in msgs] == [
            (subjects.usage_events(JS_GATEWAY), b"usage", event_id)
        ]
        await msgs[0].ack_sync(timeout=2)
        consumer = await js.consumer_info(subjects.USAGE_STREAM, durable)
        assert consumer.config.filter_subject == subjects.usage_events(JS_GATEWAY)
        assert (consumer.num_pending, consumer.num_ack_pending, consumer.delivered.consumer_seq) == (0, 0, 1)
        assert await js.delete_consumer(subjects.USAGE_STREAM, durable)
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.consumer_info(subjects.USAGE_STREAM, durable)
    assert errors == []


async def test_the_control_plane_touches_no_other_stream_and_manages_nothing(nats_server: SecuredNats) -> None:
    errors: list[str] = []
    async with _connect(nats_server, nats_server.gateway, errors) as nc:
        js = nc.jetstream(timeout=0.5)
        await _usage_stream(js)
        # Refused requests get no answer (the server sends -ERR to the error callback): a timeout.
        with pytest.raises(nats.errors.TimeoutError):
            await js.add_stream(name="OTHER", subjects=["other.>"])
        with pytest.raises(nats.errors.TimeoutError):
            await js.stream_info("OTHER")
        refused = (
            "$JS.API.STREAM.DELETE.MP_USAGE",  # the ledger's unapplied events are not for deleting
            "$JS.API.STREAM.PURGE.MP_USAGE",
            "$JS.API.STREAM.MSG.GET.MP_USAGE",
            "$JS.API.CONSUMER.CREATE.OTHER.MP_USAGE.x",  # a consumer named like our stream, on another
            "$JS.API.CONSUMER.MSG.NEXT.OTHER.ledger-x",
            "$JS.API.STREAM.NAMES",
            "$JS.API.INFO",
            "$JS.API.SERVER.REMOVE",
            "$JS.ACK.OTHER.c.1.1.1.1.1",
        )
        for subject in refused:
            await nc.publish(subject, b"{}")
        await nc.flush()
        violations = await _violations(errors, 2 + len(refused))
        # Still there, unharmed by the refused DELETE and PURGE.
        assert (await js.stream_info(subjects.USAGE_STREAM)).config.name == subjects.USAGE_STREAM
    for subject in ("$JS.API.STREAM.CREATE.OTHER", "$JS.API.STREAM.INFO.OTHER", *refused):
        assert any(f'publish to "{subject.lower()}"' in e for e in violations), (subject, violations)


async def test_a_provider_gets_nothing_of_jetstream(nats_server: SecuredNats) -> None:
    mine = nats_server.provider_token(MINE)
    errors: list[str] = []
    async with (
        _connect(nats_server, nats_server.gateway, []) as gateway,
        _connect(nats_server, mine, errors) as provider,
    ):
        js = gateway.jetstream(timeout=5)
        await _usage_stream(js)
        forged = subjects.usage_events("x")
        refused_pub = (forged, "$JS.API.STREAM.INFO.MP_USAGE", "$JS.API.STREAM.CREATE.X", "$JS.ACK.MP_USAGE.>")
        for subject in refused_pub:
            await provider.publish(subject, b"{}", headers={"Nats-Msg-Id": "forged"})
        refused_sub = ("$JS.>", "_INBOX_CP.>")
        for subject in refused_sub:
            await provider.subscribe(subject)
        await provider.flush()
        violations = await _violations(errors, len(refused_pub) + len(refused_sub))
        # Nothing forged reached the stream, and no stream X was made (the server's own store says so:
        # the control plane may not ask about X either).
        state = await js.stream_info(subjects.USAGE_STREAM, subjects_filter=forged)
        assert not (state.state.subjects or {}).get(forged)
        streams = nats_server.state_dir / JETSTREAM_DIR / server_config.APP_ACCOUNT / "streams"
        assert subjects.USAGE_STREAM in os.listdir(streams)
        assert "X" not in os.listdir(streams)
    for subject in refused_pub:
        assert any(f'publish to "{subject.lower()}"' in e for e in violations), (subject, violations)
    for subject in refused_sub:
        assert any(f'subscription to "{subject.lower()}"' in e for e in violations), (subject, violations)
