"""Admission: a flood of unknown ids is admitted at the configured rate across replicas; pins,
bans and drains take effect at once on every replica (real NATS, Postgres, gateways, daemons)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import nats
import pytest

from infra.components import Child, DaemonChild, get_json, start_daemon, start_gateway, wait_model
from infra.nats_auth import SecuredNats
from infra.ports import free_port
from infra.postgres import PostgresServer
from schemas import bus, subjects
from schemas.permissions import Permissions
from services.providers import store
from tests.support.admin_cli import providers_cli
from tests.support.auth_stack import AuthStack
from tests.support.daemons import status as daemon_status
from tests.support.daemons import wait_worker
from tests.support.databases import fresh_database
from tests.support.stack import Stack

RATE = 10  # provisional admissions per minute on the flood stack
FLOOD = 1000
DRAINED_TOKENS = 3000


# ---- an isolated database: the bucket and the table belong to these tests alone -------------------


@pytest.fixture(scope="module")
def admission_db(postgres: PostgresServer) -> str:
    return fresh_database(postgres, "mp_admission")


@pytest.fixture
async def db(admission_db: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(admission_db, min_size=8, max_size=8)
    await pool.execute("DELETE FROM providers")
    await pool.execute("UPDATE provider_admission_bucket SET tokens = NULL, refilled_at = now()")
    yield pool
    await pool.close()


async def _level(db: asyncpg.Pool) -> float:
    value = await db.fetchval(
        "SELECT least($1, coalesce(tokens, $1) + extract(epoch FROM now() - refilled_at) * $1 / 60.0)"
        " FROM provider_admission_bucket",
        float(RATE),
    )
    return float(value)


async def test_replicas_racing_for_one_id_spend_one_token(db: asyncpg.Pool) -> None:
    await store.sight(db, ["racer"])
    attempts = await asyncio.gather(*(store.try_admit(db, "racer", RATE) for _ in range(8)))
    assert sum(a.admitted for a in attempts) == 1
    assert await _level(db) == pytest.approx(RATE - 1, abs=0.05)
    assert (await store.sight(db, ["racer"]))["racer"].status == "provisional"


async def test_concurrent_replicas_never_admit_more_than_the_bucket(db: asyncpg.Pool) -> None:
    ids = [f"flood-{i:04d}" for i in range(300)]
    await store.sight(db, ids)
    started = time.monotonic()

    async def replica(seed: int) -> None:
        order = ids[:]
        random.Random(seed).shuffle(order)
        for pid in order:
            await store.try_admit(db, pid, RATE)

    await asyncio.gather(*(replica(seed) for seed in range(6)))  # 1,800 draws over six connections
    elapsed = time.monotonic() - started
    admitted = await db.fetchval("SELECT count(*) FROM providers WHERE status = 'provisional'")
    assert RATE <= admitted <= RATE + int(elapsed * RATE / 60), (admitted, elapsed)


async def test_pins_bans_and_drains_are_announced_to_every_replica(db: asyncpg.Pool, admission_db: str) -> None:
    heard: list[dict[str, Any]] = []
    conn = await asyncpg.connect(admission_db)
    await conn.add_listener(store.CHANNEL, lambda *args: heard.append(json.loads(args[3])))
    try:
        await store.sight(db, ["quiet", "loud"])  # new pending rows are nobody else's business
        await store.touch(db, ["quiet"], older_than_s=0)  # nor are sightings
        await store.set_status(db, "loud", "pinned", "trusted")
        await store.set_draining(db, "loud", True, None)
        await store.set_status(db, "loud", "banned", "misbehaved")
        assert await store.change_status(db, "loud", from_status="banned", to_status="provisional", note=None)
        assert not await store.change_status(db, "loud", from_status="banned", to_status="provisional", note=None)
        for _ in range(50):
            if len(heard) >= 4:
                break
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    assert [(n["id"], n["status"], n["draining"]) for n in heard] == [
        ("loud", "pinned", False),
        ("loud", "pinned", True),
        ("loud", "banned", True),
        ("loud", "provisional", True),
    ]
    rows = {r["provider_id"]: r for r in await store.list_providers(db)}
    assert rows["loud"]["note"] == "misbehaved"
    assert rows["quiet"]["status"] == "pending"
    assert rows["quiet"]["last_seen"] is not None


def test_a_lookup_that_raced_a_notice_does_not_undo_it() -> None:
    from services.providers.admission import Admission, Verdict

    now = [0.0]
    changes: list[tuple[str, Verdict]] = []
    admission = Admission(None, "postgresql://unused", per_minute=RATE, clock=lambda: now[0])  # type: ignore[arg-type]
    admission.on_change(lambda pid, verdict: changes.append((pid, verdict)))
    assert admission.check("x") is Verdict.PENDING  # unknown: a lookup is queued
    asked_at = now[0] = 1.0  # the lookup is sent; its snapshot says pending
    now[0] = 2.0
    admission._notified(
        json.dumps({"id": "x", "status": "provisional", "draining": False})
    )  # another replica admitted it
    now[0] = 3.0
    admission._apply("x", Verdict.PENDING, asked_at=asked_at)  # the lookup's answer arrives late
    assert admission.check("x") is Verdict.ADMITTED
    admission._apply("x", Verdict.BANNED, asked_at=now[0])  # a lookup sent after the notice counts
    assert admission.check("x") is Verdict.BANNED
    assert changes == [("x", Verdict.ADMITTED), ("x", Verdict.BANNED)]


# ---- a flood of 1,000 unknown ids against two gateway replicas -----------------------------------


@dataclass
class FloodStack:
    nats: SecuredNats
    database_url: str
    replicas: list[str]
    flooder: str  # a NATS URL with a user that may publish any heartbeat (it stands for 1,000 Macs)


@pytest.fixture(scope="module")
def flood_stack(tmp_path_factory: pytest.TempPathFactory, admission_db: str) -> Iterator[FloodStack]:
    home = tmp_path_factory.mktemp("mp-flood")
    # The flooder is a login of the server's own (not a provider: the callout never sees it).
    secured = SecuredNats.start(
        home / "nats",
        database_url=admission_db,
        tool_users={"flood": Permissions(publish=(subjects.HEARTBEATS,), subscribe=())},
    )
    flooder = secured.tool("flood")
    ports = [free_port(), free_port()]
    env = {"MP_PROVISIONAL_ADMISSIONS_PER_MIN": str(RATE), "MP_LOG_LEVEL": "info"}

    def start(i: int) -> Child:
        return start_gateway(
            home, port=ports[i], nats=secured, database_url=admission_db, name=f"gateway-flood-{i}", env=env
        )

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start, i) for i in range(2)]
    children = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            f.result()
        yield FloodStack(secured, admission_db, [f"http://127.0.0.1:{p}" for p in ports], flooder.in_url(secured.url))
    finally:
        for child in children:
            child.stop()
        secured.stop()


def _heartbeat(pid: str) -> bytes:
    return bus.encode(
        bus.Heartbeat(
            provider_id=pid,
            daemon_version="flood",
            boot_id="b",
            models=[bus.ModelInfo("flood-model")],
            slots=1,
            slots_free=1,
            queue_depth=0,
            queue_limit=0,
            decode_tps=1.0,
            interval_s=1.0,
            sent_at_ms=int(time.time() * 1000),
        )
    )


def _pool_size(replica: str) -> int:
    status, body = get_json(f"{replica}/v1/status")
    assert status == 200
    assert isinstance(body, dict)
    return int(body["capacity"]["providers"])


async def test_a_flood_of_unknown_ids_is_admitted_at_the_configured_rate(flood_stack: FloodStack) -> None:
    fs = flood_stack
    ids = [f"flood-{i:04d}" for i in range(FLOOD)]
    pinned = ids[:5]
    db = await asyncpg.connect(fs.database_url)
    await db.execute("DELETE FROM providers")
    await db.execute("UPDATE provider_admission_bucket SET tokens = NULL, refilled_at = now()")
    for pid in pinned:
        await store.set_status(db, pid, "pinned", "known Mac")
    nc = await nats.connect(fs.flooder)

    async def beat() -> None:
        # 1,000 heartbeats a second, as 1,000 daemons would send them.
        while True:
            for pid in ids:
                await nc.publish(subjects.heartbeat(pid), _heartbeat(pid))
            await nc.flush()
            await asyncio.sleep(1.0)

    started = time.monotonic()
    beating = asyncio.create_task(beat())
    try:
        # Until every id is on record and both replicas route what was admitted (each beat is a second apart).
        deadline = started + 20
        while True:
            await asyncio.sleep(0.25)
            rows = await db.fetch("SELECT status, count(*) AS n FROM providers GROUP BY status")
            counts: dict[str, int] = {r["status"]: r["n"] for r in rows}
            admitted = counts.get("provisional", 0) + counts.get("pinned", 0)
            sizes = await asyncio.to_thread(lambda: [_pool_size(r) for r in fs.replicas])
            if sum(counts.values()) == FLOOD and counts.get("provisional", 0) >= RATE and sizes == [admitted, admitted]:
                break
            assert time.monotonic() < deadline, (counts, sizes)
        elapsed = time.monotonic() - started
        # Every id is on record, the pinned ones are in, and unknown ones only at the rate.
        assert counts["pinned"] == len(pinned)
        assert RATE <= counts["provisional"] <= RATE + int(elapsed * RATE / 60), (counts, elapsed)
        print(f"\nflood: {FLOOD} ids over {elapsed:.1f} s, {counts['provisional']} provisionally admitted, {counts}")

        # An operator pins one that waits: both replicas route it within a heartbeat, bucket or not.
        waiting = await db.fetchval("SELECT provider_id FROM providers WHERE status = 'pending' LIMIT 1")
        code, out = await providers_cli(
            "pin", waiting, "--note", "vouched for", nats_url=fs.nats.gateway_url, database_url=fs.database_url
        )
        assert code == 0, out
        pinned_at = time.monotonic()
        # (The bucket refills meanwhile, one token every 60 / RATE s: count what is admitted now.)
        admitted_now = "SELECT count(*) FROM providers WHERE status IN ('pinned', 'provisional')"
        while (sizes := [_pool_size(r) for r in fs.replicas]) != [await db.fetchval(admitted_now)] * 2:
            assert time.monotonic() - pinned_at < 2.5, sizes
            await asyncio.sleep(0.05)
        assert sizes[0] >= admitted + 1
        print(f"pin: routed by both replicas {time.monotonic() - pinned_at:.2f} s after the CLI returned")
        code, out = await providers_cli(
            "list", "--status", "pinned", nats_url=fs.nats.gateway_url, database_url=fs.database_url
        )
        assert code == 0
        assert waiting in out
        assert "vouched for" in out
    finally:
        beating.cancel()
        await nc.close()
        await db.close()


# ---- ban and drain on the main stack, seen by two replicas ---------------------------------------


def _body(model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": max_tokens,
        "stream": True,
    }


async def _read_stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str], started: asyncio.Event
) -> tuple[list[dict[str, Any]], float]:
    """The stream's JSON chunks, and when [DONE] came; `started` is set after a few content chunks."""
    chunks: list[dict[str, Any]] = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        # Events end with a blank line; the model's text may hold characters that splitlines() breaks on.
        buffer = b""
        async for data in r.aiter_bytes():
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if event == b"data: [DONE]":
                    return chunks, time.monotonic()
                if event.startswith(b"data: "):
                    chunks.append(json.loads(event.removeprefix(b"data: ")))
            if (
                not started.is_set()
                and sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) >= 3
            ):
                started.set()
    raise AssertionError(f"stream ended without [DONE]: {chunks[-3:]}")


@pytest.fixture(scope="module")
def operated(stack: Stack) -> Iterator[dict[str, DaemonChild]]:
    """One daemon to ban and one to drain, each the only one serving its model; they boot side by side."""
    daemons = {
        pid: start_daemon(
            stack.home,
            nats=stack.nats,
            provider_id=pid,
            model_id=f"tiny-llama-{pid}",
            model_path=stack.model_path,
            # A drained daemon lets its running requests finish, however long they take here.
            env={"MP_HEARTBEAT_S": "0.5", "MP_DRAIN_TIMEOUT_S": "300"},
        )
        for pid in ("ban-mac", "drain-mac")
    }
    try:
        for daemon in daemons.values():
            wait_worker(daemon)
        yield daemons
    finally:
        for daemon in daemons.values():
            daemon.stop()


def _unavailable(replica: str, model: str, stack: Stack) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(f"{replica}/v1/chat/completions", json=body, headers=stack.auth(), timeout=10)
    return r.status_code == 503 and r.json()["error"]["code"] == "coordinator_unavailable"


async def test_a_ban_stops_running_streams_on_every_replica_at_once(
    stack: Stack, auth_stack: AuthStack, operated: dict[str, DaemonChild]
) -> None:
    pid = "ban-mac"
    model, daemon = f"tiny-llama-{pid}", operated[pid]
    replicas = [stack.base_url, auth_stack.a]
    db = await asyncpg.connect(stack.database_url)
    try:
        for replica in replicas:
            wait_model(replica, model, timeout=30, daemon=daemon)
        started = [asyncio.Event(), asyncio.Event()]
        async with httpx.AsyncClient(timeout=60) as client:
            streams = [
                asyncio.create_task(_read_stream(client, r, _body(model, 30_000), stack.auth(), s))
                for r, s in zip(replicas, started, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), timeout=30)
            banned_at = time.monotonic()
            await store.set_status(db, pid, "banned", "test: misbehaved")
            results = await asyncio.wait_for(asyncio.gather(*streams), timeout=10)
        for chunks, ended in results:
            last = chunks[-1]
            assert last["choices"][0]["finish_reason"] == "error", last
            assert last["error"]["code"], last
            assert ended - banned_at < 1.0, "the ban stops the stream at once"
        print(f"\nban: streams ended {[round((e - banned_at) * 1000) for _, e in results]} ms after the commit")
        # Never routed again (it is off the bus too: the callout refuses it); its running work was
        # cancelled (the gateways' cancels reach it before the callout service closes its connection).
        await asyncio.sleep(1.5)
        assert daemon.alive()
        for replica in replicas:
            assert _unavailable(replica, model, stack)
            _, body = get_json(f"{replica}/v1/status")
            assert isinstance(body, dict)
            assert model not in [m["id"] for m in body["models"]]
        assert daemon_status(daemon)["requests"]["in_flight"] == 0
    finally:
        await db.close()


async def test_drain_finishes_running_work_and_takes_no_more(
    stack: Stack, auth_stack: AuthStack, operated: dict[str, DaemonChild]
) -> None:
    pid = "drain-mac"
    model, daemon = f"tiny-llama-{pid}", operated[pid]
    replicas = [stack.base_url, auth_stack.a]
    for replica in replicas:
        wait_model(replica, model, timeout=30, daemon=daemon)
    started = asyncio.Event()
    async with httpx.AsyncClient(timeout=240) as client:
        # Long enough to outlast the admin CLI's start (the tiny model writes hundreds of tokens a second).
        stream = asyncio.create_task(
            _read_stream(client, stack.base_url, _body(model, DRAINED_TOKENS), stack.auth(), started)
        )
        await asyncio.wait_for(started.wait(), timeout=30)
        code, out = await providers_cli(
            "drain", pid, "--note", "maintenance", nats_url=stack.nats_url, database_url=stack.database_url
        )
        assert code == 0, out
        assert "confirmed it is draining" in out, out
        # No new work anywhere, at once; the running stream goes on.
        for replica in replicas:
            assert _unavailable(replica, model, stack)
        assert not stream.done()
        chunks, _ = await asyncio.wait_for(stream, timeout=240)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop"), chunks[-1]
    assert "error" not in chunks[-1]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(text) > 500, "the whole answer, not a cut one"
    assert daemon_status(daemon)["status"] == "draining"
    code, out = await providers_cli("list", nats_url=stack.nats_url, database_url=stack.database_url)
    assert code == 0
    (line,) = [row for row in out.splitlines() if row.startswith(pid)]
    assert "yes" in line
    assert "maintenance" in line
    code, out = await providers_cli("undrain", pid, nats_url=stack.nats_url, database_url=stack.database_url)
    assert code == 0, out
    # The gateways would route to it again, but the daemon itself stays drained until restarted.
    assert _unavailable(stack.base_url, model, stack)


def test_admin_refuses_a_provider_id_that_cannot_be_a_subject(stack: Stack) -> None:
    code, out = asyncio.run(providers_cli("ban", "a.b>", nats_url=stack.nats_url, database_url=stack.database_url))
    assert code == 2
    assert "not a provider id" in out
