"""Extra provider daemons for daemon tests: start, wait for the worker, talk to the local APIs and the bus."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats

from infra.components import DaemonChild, start_daemon
from infra.nats_auth import NatsTarget, control_url
from schemas import bus, subjects


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
def running_daemon(
    home: Path,
    *,
    nats: NatsTarget,
    provider_id: str,
    model_id: str,
    model_path: Path,
    env: dict[str, str] | None = None,
) -> Iterator[DaemonChild]:
    daemon = start_daemon(
        home,
        nats=nats,
        provider_id=provider_id,
        model_id=model_id,
        model_path=model_path,
        env={"MP_HEARTBEAT_S": "0.5", **(env or {})},
    )
    try:
        wait_worker(daemon)
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
