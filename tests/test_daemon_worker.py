"""The daemon as a good citizen: a supervised worker process, the admin API, idle unload, SIGTERM.

Real daemons on the tiny model, real NATS; the worker is killed for real.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import msgspec
import nats
import pytest

from infra.components import DaemonChild, start_daemon, wait_model
from schemas import bus, subjects
from tests.support import logs
from tests.support.daemons import chat, daemon_in_pool, running_daemon, status, wait_worker
from tests.support.stack import Stack

MODEL = "tiny-llama-worker"
PROVIDER = "worker-mac"


@pytest.fixture(scope="module")
def daemon(stack: Stack) -> Iterator[DaemonChild]:
    with daemon_in_pool(
        stack,
        provider_id=PROVIDER,
        model_id=MODEL,
        # A tiny-model step takes milliseconds: 3 s without one is a hang.
        env={"MP_WORKER_STALL_S": "3"},
    ) as d:
        yield d


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_admin_health_and_status(daemon: DaemonChild) -> None:
    health = httpx.get(f"{daemon.admin_url}/admin/health").json()
    assert health == {"status": "healthy", "worker_status": "healthy", "version": health["version"]}
    body = status(daemon)
    assert body["status"] == "running"
    assert body["ports"] == {"main": daemon.api_port, "admin": daemon.admin_port}
    assert body["model"]["loaded"] is True
    assert body["model"]["name"] == MODEL
    assert body["worker"]["healthy"] is True
    assert body["worker"]["status"] == "healthy"
    assert _alive(body["worker"]["pid"])
    assert body["worker"]["pid"] != daemon.proc.pid
    assert body["worker"]["rss_bytes"] > 0
    assert body["config"]["idle_timeout_seconds"] == 600
    assert body["config"]["total_ram_gb"] > 0
    assert "path" not in body["model"]  # the model is named by its id, no file paths
    assert body["pool"] == {
        "provider_id": PROVIDER,
        "nats_url": body["pool"]["nats_url"],
        "connected": True,
        "draining": False,
        "served": body["pool"]["served"],
        # How the pool sees its models, once a gateway has said (test_verified_models.py).
        "models": body["pool"]["models"],
    }
    assert body["requests"]["in_flight"] == 0
    assert body["admission"]["max_safe_context"] == 1 << 16
    assert body["admission"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # k+v, layers, kv heads, head dim, f32
    # Only the loopback interface: the admin API is for the Mac's owner.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{_external_ip()}:{daemon.admin_port}/admin/health", timeout=2)


def _external_ip() -> str:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))
        ip: str = s.getsockname()[0]
    return ip if not ip.startswith("127.") else "0.0.0.0"


def test_unload_then_load(daemon: DaemonChild, stack: Stack) -> None:
    pid = status(daemon)["worker"]["pid"]
    admin = {**daemon.admin_headers(), "content-type": "application/json"}
    r = httpx.post(f"{daemon.admin_url}/admin/unload", headers=admin, timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "success"
    assert body["model_name"] == MODEL
    assert body["memory_freed_gb"] > 0
    assert body["unload_time"] >= 0
    assert not _alive(pid), "the worker process is gone: all its memory is back"
    assert httpx.get(f"{daemon.admin_url}/admin/health").json()["worker_status"] == "no_worker"
    assert status(daemon)["model"]["loaded"] is False
    again = httpx.post(f"{daemon.admin_url}/admin/unload", headers=admin)
    assert (again.status_code, again.json()) == (400, {"detail": "No model loaded"})
    # Nothing to serve: the local API says so, and the pool stops routing here.
    assert chat(daemon, max_tokens=2).status_code == 503
    assert httpx.get(f"{daemon.api_url}/v1/models").json()["data"] == []

    # Inside the models folder but no model there.
    bad = httpx.post(f"{daemon.admin_url}/admin/load", params={"model_path": "nonexistent"}, headers=admin, timeout=30)
    assert bad.status_code == 500
    assert "Load failed" in bad.json()["detail"]

    # A folder named relative to the models folder, as in seed 001's examples.
    assert stack.model_path.parent == stack.home / "models"
    r = httpx.post(
        f"{daemon.admin_url}/admin/load", params={"model_path": stack.model_path.name}, headers=admin, timeout=90
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success"
    assert body["model_name"] == MODEL  # the configured id for the configured folder
    assert body["load_time"] > 0
    assert "memory_gb" in body
    assert chat(daemon, max_tokens=2).status_code == 200
    wait_model(stack.base_url, MODEL, timeout=10)

    # Two loads at once (an owner's load while another still runs) run one after the other: both
    # succeed and the model stays loaded. Interleaved, the older one's failure handling once tore
    # down the newer one's worker ("no prepare helper could start", seen in test_verified_models);
    # this only catches that when the timing lines up, which it does not every run.
    with ThreadPoolExecutor(2) as pool:
        both = list(
            pool.map(
                lambda _: httpx.post(
                    f"{daemon.admin_url}/admin/load",
                    params={"model_path": stack.model_path.name},
                    headers=admin,
                    timeout=120,
                ),
                range(2),
            )
        )
    assert [r.status_code for r in both] == [200, 200], [r.text for r in both]
    assert status(daemon)["model"]["loaded"] is True
    assert chat(daemon, max_tokens=2).status_code == 200


def test_fit_report(daemon: DaemonChild) -> None:
    fit = httpx.get(f"{daemon.admin_url}/admin/fit", headers=daemon.admin_headers()).json()
    assert fit["model"] == MODEL
    report = fit["report"]
    assert report["fits"] is True
    assert report["weights_bytes"] > 0
    assert report["kv_bytes_per_token"] == 512
    assert report["max_safe_context"] == 1 << 16
    assert report["predicted_decode_tps"] > 0
    assert {row["sku"] for row in fit["sku_matrix"]} >= {"M1 8 GB", "M4 Pro 24 GB", "M4 Max 128 GB"}


async def _heartbeats(nats_url: str, provider: str, sink: list[bus.Heartbeat], stop: asyncio.Event) -> None:
    nc = await nats.connect(nats_url)
    decoder = bus.decoder(bus.Heartbeat)

    async def on_beat(msg: Any) -> None:
        sink.append(decoder.decode(msg.data))

    await nc.subscribe(subjects.heartbeat(provider), cb=on_beat)
    await stop.wait()
    await nc.close()


async def test_worker_killed_mid_request_fails_cleanly_restarts_and_tells_the_pool(
    daemon: DaemonChild, stack: Stack
) -> None:
    wait_worker(daemon)
    beats: list[bus.Heartbeat] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(_heartbeats(stack.nats_url, PROVIDER, beats, stop))
    old_pid = status(daemon)["worker"]["pid"]
    restarts = status(daemon)["worker"]["restarts"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 30_000, "stream": True}
    events: list[str] = []
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", f"{stack.v1}/chat/completions", json=body, headers=stack.auth()) as r,
    ):
        async for line in r.aiter_lines():
            if line:
                events.append(line.removeprefix("data: "))
            if len(events) == 5:
                os.kill(old_pid, signal.SIGKILL)
                killed_at = time.monotonic()
    failed_after = time.monotonic() - killed_at
    # The buyer's stream ends in-band with the reason, then [DONE]: never a silent cut.
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "error"
    assert "worker" in last["error"]["message"]
    assert failed_after < 2.0, failed_after

    await asyncio.to_thread(wait_worker, daemon)
    restart_s = time.monotonic() - killed_at
    after = status(daemon)
    assert after["worker"]["pid"] != old_pid
    assert after["worker"]["restarts"] == restarts + 1
    assert "SIGKILL" in after["worker"]["last_crash"]
    # Served again, through the pool.
    async with httpx.AsyncClient(timeout=30) as client:
        r2 = await client.post(
            f"{stack.v1}/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            headers=stack.auth(),
        )
    assert r2.status_code == 200, r2.text
    await asyncio.sleep(0.6)
    stop.set()
    await watcher
    # The pool heard it: while restarting the daemon offered no room at all.
    restarting = [b for b in beats if b.worker == "restarting"]
    assert restarting, [b.worker for b in beats]
    assert all(b.slots_free == 0 and b.queue_limit == 0 for b in restarting)
    assert beats[-1].worker == "healthy"
    assert beats[-1].slots_free == beats[-1].slots
    crash = logs.wait_event(daemon.log_path, "worker_crashed")
    assert crash["returncode"] == "-9"
    print(f"\nworker restart after SIGKILL: {restart_s:.2f}s (tiny model)")


def _signal_worker_mid_stream(daemon: DaemonChild, sig: signal.Signals) -> tuple[int, list[str], float]:
    """Stream a long local request and send `sig` to the worker at the third chunk.

    Returns the worker's pid, the SSE payloads and the seconds from the signal to the stream's end.
    """
    wait_worker(daemon)
    pid = int(status(daemon)["worker"]["pid"])
    payloads: list[str] = []
    signalled_at = 0.0
    with httpx.stream(
        "POST",
        f"{daemon.api_url}/v1/chat/completions",
        json={"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30_000, "stream": True},
        timeout=60,
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                payloads.append(line.removeprefix("data: "))
            if len(payloads) == 3 and not signalled_at:
                os.kill(pid, sig)
                signalled_at = time.monotonic()
    return pid, payloads, time.monotonic() - signalled_at


def test_local_request_fails_cleanly_when_the_worker_dies(daemon: DaemonChild) -> None:
    _, payloads, _ = _signal_worker_mid_stream(daemon, signal.SIGKILL)
    assert payloads[-1] == "[DONE]"
    err = json.loads(payloads[-2])
    assert err["choices"][0]["finish_reason"] == "error"
    assert err["error"]["code"] == "worker_crashed"
    wait_worker(daemon)
    assert chat(daemon, max_tokens=3).status_code == 200


def test_a_hung_worker_is_killed_and_replaced(daemon: DaemonChild) -> None:
    """Alive but making no progress (here: SIGSTOPped) while holding a request: killed, restarted."""
    pid, payloads, ended_after = _signal_worker_mid_stream(daemon, signal.SIGSTOP)
    assert payloads[-1] == "[DONE]"
    err = json.loads(payloads[-2])
    assert err["error"]["code"] == "worker_crashed"
    assert "stopped making progress" in err["error"]["message"]
    # MP_WORKER_STALL_S=3, checked every 0.75 s.
    assert 2.5 < ended_after < 8, ended_after
    assert not _alive(pid) or _zombie(pid), "the hung worker was killed"
    wait_worker(daemon)
    assert status(daemon)["worker"]["pid"] != pid
    assert chat(daemon, max_tokens=3).status_code == 200
    hung = logs.wait_event(daemon.log_path, "worker_hung")
    assert hung["pid"] == str(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def test_idle_unload_returns_memory_then_reloads_on_demand(stack: Stack) -> None:
    with running_daemon(
        stack.home,
        nats=stack.nats,
        provider_id="idle-mac",
        model_id="tiny-llama-idle",
        model_path=stack.model_path,
        env={"MP_IDLE_UNLOAD_S": "1"},
    ) as d:
        before = status(d)
        pid, rss = before["worker"]["pid"], before["worker"]["rss_bytes"]
        assert rss > 0
        wait_worker(d, "no_worker", timeout=10)
        after = status(d)
        assert not _alive(pid)
        assert after["worker"]["rss_bytes"] == 0
        assert after["model"]["idle_unloaded"] is True
        assert after["model"]["name"] == "tiny-llama-idle"
        # Still offered to the pool (reloads on demand), marked as not loaded.
        wait_model(stack.base_url, "tiny-llama-idle", timeout=10)
        started = time.monotonic()
        r = httpx.post(
            f"{stack.v1}/chat/completions",
            json={"model": "tiny-llama-idle", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            headers=stack.auth(),
            timeout=60,
        )
        reload_s = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
        assert status(d)["worker"]["pid"] not in (None, pid)
        unloaded = logs.wait_event(d.log_path, "worker_idle_unloaded")
        freed = float(unloaded["freed_mb"])
        print(f"\nidle unload freed {freed:.0f} MB RSS (tiny model); reload on demand {reload_s:.2f}s")


async def _until_refused(client: httpx.AsyncClient, d: DaemonChild) -> httpx.Response:
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    deadline = time.monotonic() + 5
    while True:
        r = await client.post(f"{d.api_url}/v1/chat/completions", json=body)
        if r.status_code == 503 or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.02)


async def test_sigterm_finishes_in_flight_work_then_leaves(stack: Stack) -> None:
    d = start_daemon(
        stack.home,
        nats=stack.nats,
        provider_id="term-mac",
        model_id="tiny-llama-term",
        model_path=stack.model_path,
        env={"MP_HEARTBEAT_S": "0.5", "MP_DRAIN_TIMEOUT_S": "10"},
    )
    try:
        wait_worker(d)
        wait_model(stack.base_url, "tiny-llama-term", timeout=30, daemon=d)
        nc = await nats.connect(stack.nats_url)
        leaves: list[bus.Leave] = []
        leave_decoder = msgspec.msgpack.Decoder(bus.Leave)

        async def on_leave(msg: Any) -> None:
            leaves.append(leave_decoder.decode(msg.data))

        await nc.subscribe(subjects.leave("term-mac"), cb=on_leave)
        body = {
            "model": "tiny-llama-term",
            "messages": [{"role": "user", "content": "Count."}],
            "max_tokens": 400,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        payloads: list[str] = []
        async with (
            httpx.AsyncClient(timeout=60) as client,
            client.stream("POST", f"{stack.v1}/chat/completions", json=body, headers=stack.auth()) as r,
        ):
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    payloads.append(line.removeprefix("data: "))
                if len(payloads) == 3:
                    d.proc.send_signal(signal.SIGTERM)
                    signalled = time.monotonic()
                    # New work is refused while draining.
                    refused = await _until_refused(client, d)
        code = await asyncio.to_thread(d.proc.wait, 30)
        exited_after = time.monotonic() - signalled
        await nc.flush()
        await nc.close()
    finally:
        d.stop()
    assert code == 0
    assert exited_after < 15, exited_after
    # The in-flight request was finished, not cut.
    assert payloads[-1] == "[DONE]"
    usage = json.loads(payloads[-2])["usage"]
    assert usage["completion_tokens"] == 400
    assert json.loads(payloads[-3])["choices"][0]["finish_reason"] == "length"
    assert refused.json()["error"]["code"] == "draining"
    assert [leave.provider_id for leave in leaves] == ["term-mac"]
    assert logs.events(d.log_path, "daemon_stopped")


def test_doctor_checks_the_machine_model_and_pool(stack: Stack) -> None:
    import subprocess
    import sys

    def doctor(nats_url: str, model_path: str) -> tuple[int, dict[str, dict[str, str]]]:
        env = {**os.environ, "NATS_URL": nats_url, "MP_MODEL_PATH": model_path, "MP_ADMIN_PORT": "0"}
        done = subprocess.run(
            [sys.executable, "-m", "daemon", "doctor", "--json"], env=env, capture_output=True, text=True, timeout=60
        )
        return done.returncode, {c["name"]: c for c in json.loads(done.stdout)}

    code, checks = doctor(stack.nats_url, str(stack.model_path))
    assert code == 0, checks
    assert checks["pool"]["status"] == "ok"
    assert checks["model"]["status"] == "ok"
    assert checks["fit"]["status"] == "ok"
    assert "65536 tokens of context" in checks["fit"]["detail"]
    assert checks["admin port"]["detail"] == "turned off (port 0)"
    code, checks = doctor("nats://127.0.0.1:1", "/nonexistent")
    assert code == 1
    assert checks["pool"]["status"] == "fail"
    assert checks["pool"]["fix"]
    assert checks["model"]["status"] == "fail"


def test_a_worker_that_cannot_restart_keeps_trying_until_it_can(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import shutil

    folder = tmp_path_factory.mktemp("fragile") / "tiny-llama-fragile"
    shutil.copytree(stack.model_path, folder)
    with running_daemon(
        stack.home, nats=stack.nats, provider_id="fragile-mac", model_id="tiny-fragile", model_path=folder
    ) as d:
        pid = status(d)["worker"]["pid"]
        weights, away = folder / "model.safetensors", folder / "model.safetensors.away"
        weights.rename(away)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "could not load" not in (status(d)["worker"]["last_crash"] or "") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "could not load" in status(d)["worker"]["last_crash"]
        assert httpx.get(f"{d.admin_url}/admin/health").json()["worker_status"] == "dead"
        refused = chat(d, max_tokens=2)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "worker_restarting"
        away.rename(weights)
        wait_worker(d, timeout=60)
        assert chat(d, max_tokens=2).status_code == 200
        assert logs.events(d.log_path, "worker_restart_failed")
