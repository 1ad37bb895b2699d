"""Extra provider daemons for daemon tests: start, wait for the worker, talk to the local APIs and the bus."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.aio.client import Client

from daemon.engine.base import Engine
from infra.components import DaemonChild, start_daemon, wait_model
from infra.nats_auth import NatsTarget, control_url
from schemas import bus, subjects
from tests.support import logs
from tests.support.stack import Stack


def spawn_daemon(home: Path, **options: Any) -> DaemonChild:
    """`infra.components.start_daemon`, started again on other ports if one of its local ports was taken.

    The ports are free when chosen, but another process (a parallel test worker's, or an outgoing
    connection's local port) can take one before the daemon binds it; the daemon then serves the pool
    without that listener, and a test would talk to whoever holds the port.
    """
    for _ in range(3):
        log_path = home / "logs" / f"daemon-{options['provider_id']}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        daemon = start_daemon(home, **options)
        if _listening(daemon, offset if daemon.log_path == log_path else 0):
            return daemon
        daemon.stop()
    raise AssertionError(f"{daemon.name} could not bind its local ports three times:\n{daemon.log_tail()}")


def _listening(daemon: DaemonChild, since: int, timeout: float = 120.0) -> bool:
    """True once both local listeners of this start are up, False if one could not bind."""
    deadline = time.monotonic() + timeout
    while True:
        if logs.events(daemon.log_path, "local_http_failed", since=since):
            return False
        if len(logs.events(daemon.log_path, "local_http_listening", since=since)) >= 2:
            return True
        if not daemon.alive():
            raise AssertionError(f"{daemon.name} exited while starting:\n{daemon.log_tail()}")
        assert time.monotonic() < deadline, f"{daemon.name} never listened:\n{daemon.log_tail()}"
        time.sleep(0.05)


def wait_worker(daemon: DaemonChild, status: str = "healthy", timeout: float = 90.0) -> dict[str, Any]:
    """Until /admin/health reports the worker `status`; returns that health body."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise AssertionError(f"{daemon.name} exited:\n{daemon.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            last = httpx.get(f"{daemon.admin_url}/admin/health", timeout=10).json()
            if last["worker_status"] == status:
                return dict(last)
        time.sleep(0.05)
    raise AssertionError(f"worker never {status} (last {last}):\n{daemon.log_tail()}")


@contextlib.contextmanager
def daemon_in_pool(
    stack: Stack,
    *,
    provider_id: str,
    model_id: str,
    model_path: Path | None = None,
    engine: str = "mlx",
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> Iterator[DaemonChild]:
    """A provider daemon serving `model_id` (the stack's tiny model unless `model_path`) to the stack's pool.

    Yields once the stack's gateway routes the model to it (its heartbeat every 0.5 s); stopped after.
    """
    if model_path is None and engine == "mlx":
        model_path = stack.model_path
    with _daemon(stack.home, stack.nats, provider_id, model_id, model_path, engine, env) as daemon:
        wait_model(stack.base_url, model_id, timeout=timeout, daemon=daemon)
        yield daemon


@contextlib.contextmanager
def running_daemon(
    home: Path,
    *,
    nats: NatsTarget,
    provider_id: str,
    model_id: str,
    model_path: Path,
    env: dict[str, str] | None = None,
) -> Iterator[DaemonChild]:
    """A daemon whose worker is up (in the pool or not yet); stopped after."""
    with _daemon(home, nats, provider_id, model_id, model_path, "mlx", env) as daemon:
        wait_worker(daemon)
        yield daemon


@contextlib.contextmanager
def _daemon(
    home: Path,
    nats: NatsTarget,
    provider_id: str,
    model_id: str,
    model_path: Path | None,
    engine: str,
    env: dict[str, str] | None,
) -> Iterator[DaemonChild]:
    daemon = spawn_daemon(
        home,
        nats=nats,
        provider_id=provider_id,
        model_id=model_id,
        model_path=model_path,
        engine=engine,
        env={"MP_HEARTBEAT_S": "0.5", **(env or {})},
    )
    try:
        yield daemon
    finally:
        daemon.stop()


def status(daemon: DaemonChild) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(
        f"{daemon.admin_url}/admin/status", headers=daemon.admin_headers(), timeout=10
    ).json()
    return body


def chat(daemon: DaemonChild, timeout: float = 60, **body: Any) -> httpx.Response:
    payload = {"model": "any", "messages": [{"role": "user", "content": "Hello, how are you?"}], **body}
    return httpx.post(f"{daemon.api_url}/v1/chat/completions", json=payload, timeout=timeout)


def sse_payloads(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]


def stream_text(payloads: list[str]) -> str:
    out = []
    for p in payloads:
        if p == "[DONE]":
            continue
        for choice in json.loads(p)["choices"]:
            out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


async def bus_call(
    target: NatsTarget,
    provider_id: str,
    request: bus.InferenceRequest,
    timeout: float = 60,  # noqa: ASYNC109 - a test helper's own bound
) -> list[Any]:
    """Send one request straight to a daemon over NATS (no gateway); returns its frames in order."""
    nc = await nats.connect(control_url(target))  # as the control plane: only it may send work
    try:
        reply = subjects.reply(provider_id, "testgw", request.request_id)
        frames: list[Any] = []
        done = asyncio.Event()

        async def on_frame(msg: Any) -> None:
            frame = bus.decode_frame(msg.data)
            frames.append(frame)
            if isinstance(frame, bus.Done | bus.Failed):
                done.set()

        await nc.subscribe(reply, cb=on_frame)
        await nc.publish(subjects.work(provider_id), bus.encode(request), reply=reply)
        await asyncio.wait_for(done.wait(), timeout)
        assert [f.seq for f in frames] == list(range(len(frames)))
        return frames
    finally:
        await nc.close()


def bus_request(
    request_id: str, model: str, content: str = "Hello, how are you?", **params: Any
) -> bus.InferenceRequest:
    messages = params.pop("messages", None) or [bus.BusMessage(role="user", content=content)]
    return bus.InferenceRequest(
        request_id=request_id,
        model=model,
        messages=messages,
        params=bus.SamplingParams(**{"max_tokens": 8, "temperature": 0.0, **params}),
    )


def start_signed_in_daemon(state_dir: Path, *, model_id: str, model_path: Path, log_dir: Path) -> DaemonChild:
    """A daemon as `brew services` runs it after `mac-provider-daemon login`: its identity, token and
    NATS URL come from the credentials file in `state_dir` alone (no MP_PROVIDER_ID, no token, no NATS_URL)."""
    from daemon.settings import ADMIN_TOKEN_FILE_NAME
    from infra import procs
    from infra.blas import fast_blas_env
    from infra.ports import free_port

    admin_port, api_port = free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NATS_URL", "MP_PROVIDER_ID", "MP_PROVIDER_TOKEN", "MP_NATS_USER", "MP_NATS_PASSWORD", "MP_CONFIG")
    }
    env.update(
        fast_blas_env(),
        PYTHONUNBUFFERED="1",
        MP_STATE_DIR=str(state_dir),
        MP_MODEL_PATH=str(model_path),
        MP_MODEL_ID=model_id,
        MP_ADMIN_PORT=str(admin_port),
        MP_API_PORT=str(api_port),
        MP_HEARTBEAT_S="0.5",
    )
    log_path = log_dir / f"daemon-signed-in-{state_dir.name}.log"
    proc = procs.spawn([sys.executable, "-m", "daemon", "serve"], env=env, log_path=log_path)
    return DaemonChild(
        f"daemon-{state_dir.name}",
        proc,
        log_path,
        admin_port=admin_port,
        api_port=api_port,
        admin_token_file=state_dir / ADMIN_TOKEN_FILE_NAME,
    )


def wait_pool_connected(daemon: DaemonChild, connected: bool, timeout: float = 30.0) -> float:
    """Seconds until the daemon's own status says it is (or is not) connected to the pool."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(httpx.HTTPError, KeyError):
            if status(daemon)["pool"]["connected"] is connected:
                return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"{daemon.name} never {'connected' if connected else 'disconnected'}:\n{daemon.log_tail()}")


@contextlib.asynccontextmanager
async def provider_in_process(nats_url: str, provider_id: str, engine: Engine) -> AsyncIterator[Client]:
    """A provider daemon's pool work (daemon/provider.py) in this process, and a NATS connection of the test's
    own to play its gateways with. Yields once the provider is online (its first heartbeat is out: its
    subscriptions were made before)."""
    from daemon.provider import Provider
    from daemon.settings import DaemonSettings

    settings = DaemonSettings.from_env({"NATS_URL": nats_url, "MP_PROVIDER_ID": provider_id})
    stop = asyncio.Event()
    running = asyncio.create_task(Provider(settings=settings, engine=engine).run(stop))
    nc = await nats.connect(nats_url)
    try:
        beats = await nc.subscribe(subjects.heartbeat(provider_id))
        await beats.next_msg(timeout=10)
        await beats.unsubscribe()
        yield nc
    finally:
        stop.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(running, 10)
        await nc.close()
