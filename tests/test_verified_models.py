"""Verified models end to end: weights hashes in heartbeats, the operator catalog, routing on it, canaries.

Real NATS, Postgres, gateways and daemons. Three daemons serve the catalog id `verified-tiny`:
an honest pinned one (its weights are trusted in one command), one whose weights file has one
byte changed (never routed for the id), and one that serves a tiny model of another seed while
reporting the honest weights hash (its cache was doctored): the canary catches it. A gateway of
this module's own runs the production default, MP_UNCATALOGUED_MODELS=refuse.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from daemon.models.identity import WeightsHasher
from infra.components import Child, DaemonChild, get_json, start_gateway
from infra.ports import free_port
from services.providers import store as providers
from tests.support.admin_cli import models_cli, providers_cli
from tests.support.daemons import spawn_daemon, wait_worker
from tests.support.daemons import status as daemon_status
from tests.support.ledger import written
from tests.support.stack import TINY_MODEL, Stack
from tests.support.tiny_model import write_tiny_model

MODEL = "verified-tiny"
HONEST, TAMPERED, LIAR = "verified-honest-mac", "verified-tampered-mac", "verified-liar-mac"


@dataclass
class Verified:
    stack: Stack
    refuse: str  # base URL of the gateway with MP_UNCATALOGUED_MODELS=refuse
    daemons: dict[str, DaemonChild]
    honest_sha: str
    folders: dict[str, Path]

    def start(self, pid: str) -> DaemonChild:
        daemon = spawn_daemon(
            self.stack.home,
            nats=self.stack.nats,
            provider_id=pid,
            model_id=MODEL,
            model_path=self.folders[pid],
            env={"MP_HEARTBEAT_S": "0.5"},
        )
        self.daemons[pid] = daemon
        return daemon


def _state_dir(stack: Stack, pid: str) -> Path:
    return stack.home / "daemons" / pid  # where start_daemon puts a daemon's state (its hash cache)


def _flip_one_byte(path: Path) -> None:
    """Change one byte of a float32 tensor's data: the file still loads, the weights differ."""
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01  # the low byte of the last float's mantissa (safetensors data ends the file)
    path.write_bytes(bytes(data))


def _doctor(liar: Path, stack: Stack, other_seed_weights: Path) -> None:
    """A daemon that lies: its hash cache vouches for the honest weights, its folder holds others.

    The liar's folder starts as a copy of the honest one and is hashed as the daemon would (the
    cache keys on path, size and mtime_ns); then its weights are swapped for another seed's, of
    the same size, and the old mtime is put back. The daemon then reports the honest identity.
    """
    WeightsHasher(_state_dir(stack, LIAR)).identity(liar)
    weights = liar / "model.safetensors"
    st = weights.stat()
    shutil.copyfile(other_seed_weights, weights)
    assert weights.stat().st_size == st.st_size
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture(scope="module")
def verified(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Verified]:
    models = stack.home / "models"
    honest = write_tiny_model(models / "verified-honest", seed=11)
    other = write_tiny_model(tmp_path_factory.mktemp("other-seed") / "m", seed=12)
    folders = {HONEST: honest, TAMPERED: models / "verified-tampered", LIAR: models / "verified-liar"}
    for pid in (TAMPERED, LIAR):
        shutil.rmtree(folders[pid], ignore_errors=True)
        shutil.copytree(honest, folders[pid])
        shutil.rmtree(_state_dir(stack, pid), ignore_errors=True)
    shutil.rmtree(_state_dir(stack, HONEST), ignore_errors=True)
    _flip_one_byte(folders[TAMPERED] / "model.safetensors")
    _doctor(folders[LIAR], stack, other / "model.safetensors")
    honest_sha = WeightsHasher(tmp_path_factory.mktemp("hash-state")).identity(honest).sha256

    asyncio.run(_pin(stack.database_url, HONEST))
    port = free_port()
    children: list[Child] = []
    v = Verified(stack, f"http://127.0.0.1:{port}", {}, honest_sha, folders)
    try:
        v.start(HONEST)
        v.start(TAMPERED)
        children.append(
            start_gateway(
                stack.home,
                port=port,
                nats=stack.nats,
                database_url=stack.database_url,
                name="gateway-refuse",
                env={"MP_UNCATALOGUED_MODELS": "refuse", "MP_LOG_LEVEL": "info"},
            )
        )
        for daemon in v.daemons.values():
            wait_worker(daemon)
        yield v
    finally:
        for daemon in v.daemons.values():
            daemon.stop()
        for child in children:
            child.stop()
        asyncio.run(_cleanup(stack.database_url))


async def _pin(database_url: str, pid: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await providers.set_status(conn, pid, "pinned", "test: trusted Mac")
    finally:
        await conn.close()


async def _cleanup(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DELETE FROM model_catalog WHERE model_id = $1", MODEL)
    finally:
        await conn.close()


def _until(what: str, check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:g} s (last: {last!r})")


def _identity(daemon: DaemonChild) -> dict[str, Any] | None:
    identity: dict[str, Any] | None = daemon_status(daemon)["model"]["identity"]
    return identity


def _pool_verdict(daemon: DaemonChild, model: str = MODEL) -> dict[str, Any] | None:
    """How the pool told the daemon it sees `model` (its own /admin/status)."""
    return next((m for m in daemon_status(daemon)["pool"]["models"] if m["id"] == model), None)


def _chat(base: str, stack: Stack, model: str = MODEL, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4, **extra}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=stack.auth(), timeout=30)


def _serving(base: str, providers: int) -> Callable[[], bool]:
    """A check: `base` routes MODEL to exactly `providers` providers (0: not at all)."""
    return lambda: _models_on(base).get(MODEL, 0) == providers


def _models_on(base: str) -> dict[str, int]:
    _, body = get_json(f"{base}/v1/status")
    assert isinstance(body, dict)
    return {m["id"]: m["providers"] for m in body["models"]}


async def _fetch(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def _rows(stack: Stack, query: str, *args: Any) -> list[asyncpg.Record]:
    return asyncio.run(_fetch(stack.database_url, query, *args))


def _provider(stack: Stack, pid: str) -> asyncpg.Record | None:
    rows = _rows(stack, "SELECT status, note FROM providers WHERE provider_id = $1", pid)
    return rows[0] if rows else None


def _mac_view(stack: Stack, pid: str) -> dict[str, Any]:
    """What `mac-provider-daemon status` shows the Mac's owner: `/provider/macs/<id>` with its own token."""
    r = httpx.get(
        f"{stack.base_url}/provider/macs/{pid}",
        headers={"Authorization": f"Bearer {stack.nats.provider_token(pid)}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# ---- the tests, in order: they share the daemons ------------------------------------------------


def test_a_daemon_reports_its_weights_hash_and_caches_it(verified: Verified) -> None:
    honest = verified.daemons[HONEST]
    first = _until("the honest daemon's identity", lambda: _identity(honest))
    assert first["weights_sha256"] == verified.honest_sha
    # Weights, config, tokenizer, tokenizer config, generation config: all read on the first load.
    assert first["files"] == 5
    assert first["bytes_hashed"] == first["bytes_total"] > 0
    assert first["files_from_cache"] == 0

    # The same folder loaded again: every digest comes from the cache file, nothing is read.
    r = httpx.post(
        f"{honest.admin_url}/admin/load",
        params={"model_path": verified.folders[HONEST].name},
        headers={**honest.admin_headers(), "content-type": "application/json"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    again = _until("the reloaded identity", lambda: _identity(honest))
    assert again["weights_sha256"] == verified.honest_sha
    assert again["bytes_hashed"] == 0
    assert again["files_from_cache"] == again["files"] == 5
    assert (_state_dir(verified.stack, HONEST) / "weights-sha256.json").exists()


def test_the_production_default_refuses_model_ids_the_catalog_does_not_list(verified: Verified) -> None:
    stack = verified.stack
    # The suite's own tiny model is listed nowhere: the refusing replica does not route it ...
    r = _chat(verified.refuse, stack, model=TINY_MODEL)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "coordinator_unavailable"
    assert TINY_MODEL not in _models_on(verified.refuse)
    # ... while a replica that allows uncatalogued ids (the suite's) serves it unverified.
    assert _chat(stack.base_url, stack, model=TINY_MODEL).status_code == 200
    # Before the operator vouches for them, `verified-tiny` is refused too.
    assert _chat(verified.refuse, stack).status_code == 503


def test_trusting_a_pinned_provider_lists_its_weights_in_one_command(verified: Verified) -> None:
    stack = verified.stack
    code, out = asyncio.run(models_cli("trust", HONEST, nats_url=stack.nats_url, database_url=stack.database_url))
    assert code == 0, out
    assert f"{MODEL}: weights {verified.honest_sha} listed (from {HONEST})" in out
    assert "6 canary references recorded" in out
    refs = _rows(stack, "SELECT count(*) AS n FROM canary_references WHERE weights_sha256 = $1", verified.honest_sha)
    assert refs[0]["n"] == 6
    # Every replica routes it at once, the refusing one included.
    _until("the refusing replica routes the trusted model", lambda: _models_on(verified.refuse).get(MODEL) == 1)
    r = _chat(verified.refuse, stack)
    assert r.status_code == 200, r.text
    honest = verified.daemons[HONEST]
    _until("the honest daemon hears it is verified", lambda: (_pool_verdict(honest) or {}).get("status") == "verified")

    # Only a pinned provider vouches for weights.
    code, out = asyncio.run(models_cli("trust", TAMPERED, nats_url=stack.nats_url, database_url=stack.database_url))
    assert code == 1
    assert "not pinned" in out


def test_one_byte_changed_is_not_routed_and_both_sides_see_why(verified: Verified) -> None:
    stack = verified.stack
    tampered = verified.daemons[TAMPERED]
    identity = _until("the tampered daemon's identity", lambda: _identity(tampered))
    assert identity["weights_sha256"] != verified.honest_sha
    # The Mac's owner sees why in the daemon's own status ...
    verdict = _until(
        "the tampered daemon hears why",
        lambda: (v := _pool_verdict(tampered)) is not None and v["status"] == "hash_mismatch" and v,
    )
    assert verdict["routed"] is False
    assert "not listed" in verdict["detail"]
    # ... and in the pool's view of the Mac (`/provider/macs`, asked with its own token).
    mac = _mac_view(stack, TAMPERED)
    (model,) = mac["models"]
    assert (model["id"], model["routed"], model["verification"]) == (MODEL, False, "hash_mismatch")
    assert mac["traffic"] == "not_routable"
    assert any("weights are not the ones the catalog lists" in w for w in mac["why_no_traffic"]), mac["why_no_traffic"]
    # ... and the operator in `admin models list`.
    code, out = asyncio.run(models_cli("list", nats_url=stack.nats_url, database_url=stack.database_url))
    assert code == 0, out
    (line,) = [row for row in out.splitlines() if row.startswith(TAMPERED)]
    assert "hash_mismatch" in line
    assert " no " in line
    (line,) = [row for row in out.splitlines() if row.startswith(HONEST)]
    assert "verified" in line

    # Buyers are served, by the honest Mac only, on every replica.
    for base in (stack.base_url, verified.refuse):
        assert _models_on(base).get(MODEL) == 1
        for _ in range(3):
            r = _chat(base, stack)
            assert r.status_code == 200, r.text
    assert daemon_status(tampered)["pool"]["served"] == 0


def test_revoking_weights_stops_routing_everywhere_at_once(verified: Verified) -> None:
    stack = verified.stack
    args = ("revoke", MODEL, verified.honest_sha)
    operator = {"MP_OPERATOR": "oncall-alice"}  # who a change is recorded as without --by
    code, out = asyncio.run(models_cli(*args, nats_url=stack.nats_url, database_url=stack.database_url, env=operator))
    assert code == 0, out
    sql = "SELECT revoked_by FROM model_catalog WHERE model_id = $1 AND weights_sha256 = $2"
    assert _rows(stack, sql, MODEL, verified.honest_sha)[0]["revoked_by"] == "oncall-alice"
    revoked_at = time.monotonic()
    for base in (stack.base_url, verified.refuse):
        _until(f"{base} stops routing {MODEL}", _serving(base, 0), timeout=2.0)
    took = time.monotonic() - revoked_at
    assert took < 2.0
    print(f"\nrevoke: both replicas stopped routing {took * 1000:.0f} ms after the CLI returned")
    assert _chat(verified.refuse, stack).status_code == 503
    code, out = asyncio.run(
        models_cli(
            "allow",
            MODEL,
            verified.honest_sha,
            "--note",
            "back",
            nats_url=stack.nats_url,
            database_url=stack.database_url,
        )
    )
    assert code == 0, out
    for base in (stack.base_url, verified.refuse):
        _until(f"{base} routes {MODEL} again", _serving(base, 1), timeout=2.0)


def test_a_provider_serving_other_weights_is_caught_by_the_canary_and_suspended(verified: Verified) -> None:
    stack = verified.stack
    liar = verified.start(LIAR)
    wait_worker(liar)
    # It claims the honest weights (its cache was doctored), so the catalog alone lets it in ...
    identity = _until("the liar's identity", lambda: _identity(liar))
    assert identity["weights_sha256"] == verified.honest_sha
    assert identity["bytes_hashed"] == 0
    # ... and the canary on join catches it.
    row = _until(
        "the liar suspended",
        lambda: (p := _provider(stack, LIAR)) is not None and p["status"] == "suspended" and p,
        timeout=20,
    )
    assert "canary failed" in row["note"]
    runs = _rows(stack, "SELECT result, detail, request_id FROM canary_runs WHERE provider_id = $1", LIAR)
    results = [r["result"] for r in runs]
    assert "failed" in results, runs
    assert "passed" not in results, runs
    (failed,) = [r for r in runs if r["result"] == "failed"]
    assert "where the reference has" in failed["detail"]

    # The Mac's owner sees why; so does the operator.
    verdict = _until(
        "the liar hears why", lambda: (v := _pool_verdict(liar)) is not None and v["status"] == "canary_failed" and v
    )
    assert verdict["routed"] is False
    code, out = asyncio.run(providers_cli("list", nats_url=stack.nats_url, database_url=stack.database_url))
    assert code == 0, out
    (line,) = [row for row in out.splitlines() if row.startswith(LIAR)]
    assert "suspended" in line
    assert "canary_failed" in line
    mac = _mac_view(stack, LIAR)
    assert mac["admission"] == "suspended"
    assert mac["canaries"]["failed"] >= 1
    assert mac["canaries"]["last_result"] == "failed"
    assert mac["why_no_traffic"][0].startswith("Suspended automatically (canary")

    # Buyers are served at once, by the honest Mac, on every replica.
    for base in (stack.base_url, verified.refuse):
        _until(f"{base} drops the liar", _serving(base, 1), timeout=2.0)
    ids = []
    for base in (stack.base_url, verified.refuse, stack.base_url, verified.refuse):
        r = _chat(base, stack)
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-request-id"])
    served_by = _until(
        "the buyers' requests in the ledger",
        lambda: (
            (rows := _rows(stack, "SELECT provider_id FROM usage_ledger WHERE request_id = ANY($1)", ids))
            and len(rows) == len(ids)
            and rows
        ),
    )
    assert {r["provider_id"] for r in served_by} == {HONEST}


def test_canary_traffic_is_never_billed(verified: Verified) -> None:
    stack = verified.stack
    runs = _rows(stack, "SELECT request_id, provider_id, result, ttft_ms FROM canary_runs")
    assert {r["provider_id"] for r in runs} >= {HONEST, LIAR}
    assert any(r["provider_id"] == HONEST and r["result"] in ("passed", "recorded") for r in runs), runs
    # Every answered canary measured the provider (what routing uses).
    assert all(r["ttft_ms"] is not None and r["ttft_ms"] > 0 for r in runs if r["result"] != "unanswered"), runs
    ids = [r["request_id"] for r in runs]
    assert _rows(stack, "SELECT request_id FROM usage_ledger WHERE request_id = ANY($1)", ids) == []
    assert _rows(stack, "SELECT request_id FROM reservations WHERE request_id = ANY($1)", ids) == []
    # The operator sees the runs (and the catalog as JSON, for scripts).
    code, out = asyncio.run(models_cli("canaries", LIAR, nats_url=stack.nats_url, database_url=stack.database_url))
    assert code == 0, out
    (line,) = [row for row in out.splitlines() if LIAR in row]
    assert " failed " in line
    code, out = asyncio.run(models_cli("list", "--json", nats_url=stack.nats_url, database_url=stack.database_url))
    assert code == 0, out
    rows = [json.loads(row) for row in out.splitlines()]
    listed = [r["weights_sha256"] for r in rows if r["kind"] == "catalog" and r["model_id"] == MODEL]
    assert listed == [verified.honest_sha]
    mine = {r["provider_id"]: r["status"] for r in rows if r["kind"] == "provider_model" and r["model_id"] == MODEL}
    assert mine[TAMPERED] == "hash_mismatch"
    # What the ledger bills for the model is exactly what buyers were served above (1 + 6 + 4).
    written(stack.nats_url)
    ledger = _rows(stack, "SELECT count(*) AS n FROM usage_ledger WHERE model = $1 AND outcome = 'ok'", MODEL)
    assert ledger[0]["n"] == 11


async def test_one_replica_at_a_time_holds_a_providers_canary(stack: Stack) -> None:
    from services.canary import store as canaries

    pool = await asyncpg.create_pool(stack.database_url, min_size=6, max_size=6)
    try:
        await providers.set_status(pool, "lease-mac", "provisional", "test: canary lease")
        await canaries.note_seen(pool, "lease-mac", "boot-1:abc", due_in_s=0)
        # Six replicas want it at the same instant: one gets it.
        claims = await asyncio.gather(
            *(canaries.claim(pool, f"gw-{i}", ["lease-mac"], lease_s=60, limit=4) for i in range(6))
        )
        assert sorted(len(c) for c in claims) == [0, 0, 0, 0, 0, 1]
        holder = next(i for i, c in enumerate(claims) if c)
        assert claims[holder][0].status == "provisional"
        # Nobody else while it holds the lease; given back and due again, anyone may.
        assert await canaries.claim(pool, "gw-other", ["lease-mac"], lease_s=60, limit=4) == []
        await canaries.finish(pool, "lease-mac", f"gw-{holder}", next_in_s=0, result="passed")
        assert len(await canaries.claim(pool, "gw-other", ["lease-mac"], lease_s=0, limit=4)) == 1
        # A lease its replica never gave back (it died) expires.
        assert len(await canaries.claim(pool, "gw-third", ["lease-mac"], lease_s=60, limit=4)) == 1
        # The same daemon run noted again by another replica does not move the schedule; a new run does.
        await pool.execute(
            "UPDATE provider_canaries SET next_at = now() + interval '1 hour' WHERE provider_id = $1", "lease-mac"
        )
        await canaries.note_seen(pool, "lease-mac", "boot-1:abc", due_in_s=0)
        assert await pool.fetchval("SELECT next_at > now() FROM provider_canaries WHERE provider_id = 'lease-mac'")
        await canaries.note_seen(pool, "lease-mac", "boot-2:abc", due_in_s=0)
        assert await pool.fetchval("SELECT next_at <= now() FROM provider_canaries WHERE provider_id = 'lease-mac'")
    finally:
        await pool.execute("DELETE FROM providers WHERE provider_id = 'lease-mac'")
        await pool.close()


async def test_a_heartbeat_naming_a_model_twice_is_recorded_once(stack: Stack) -> None:
    from services.catalog import store as catalog

    conn = await asyncpg.connect(stack.database_url)
    try:
        await providers.set_status(conn, "twice-mac", "provisional", "test: hostile heartbeat")
        verdict = ("m", "", "uncatalogued", True, "")
        await catalog.record_verdicts(conn, "twice-mac", [verdict, ("m", "", "not_in_catalog", False, "x"), verdict])
        rows = await catalog.provider_models(conn, "twice-mac")
        assert [(r["model_id"], r["status"]) for r in rows] == [("m", "uncatalogued")]
        # Models it no longer reports are dropped.
        await catalog.record_verdicts(conn, "twice-mac", [("n", "", "uncatalogued", True, "")])
        assert [r["model_id"] for r in await catalog.provider_models(conn, "twice-mac")] == ["n"]
    finally:
        await conn.execute("DELETE FROM providers WHERE provider_id = 'twice-mac'")
        await conn.close()
