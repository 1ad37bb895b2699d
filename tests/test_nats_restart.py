"""NATS restarts while answers are streaming: no request hangs past its timeout, and service comes back."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra.components import Child, start_daemon, start_gateway, wait_model
from infra.nats_auth import SecuredNats
from infra.ports import free_port
from tests.support.stack import Stack

MODEL = "tiny-llama-nats-restart"
TIMEOUT_S = 20


@pytest.fixture
def own_bus(stack: Stack, tmp_path: Path) -> Iterator[tuple[SecuredNats, str]]:
    """Its own nats-server, gateway and two daemons (Postgres shared), so the restart hurts no other test."""
    nats_server = SecuredNats.start(tmp_path / "nats", database_url=stack.database_url)
    children: list[Child] = []
    try:
        port = free_port()
        children.append(
            start_gateway(
                stack.home,
                port=port,
                nats=nats_server,
                database_url=stack.database_url,
                name="gateway-nats-restart",
                env={"MP_REQUEST_TIMEOUT_S": str(TIMEOUT_S)},
            )
        )
        for i in range(2):
            children.append(
                start_daemon(
                    stack.home,
                    nats=nats_server,
                    provider_id=f"nats-restart-{i}",
                    model_id=MODEL,
                    model_path=stack.model_path,
                    env={"MP_HEARTBEAT_S": "0.5"},
                )
            )
        base = f"http://127.0.0.1:{port}"
        wait_model(base, MODEL, timeout=60)
        yield nats_server, base
    finally:
        for child in reversed(children):
            child.stop()
        nats_server.stop()


async def _stream(client: httpx.AsyncClient, base: str, key: str) -> tuple[str, float]:
    """How the stream ended ('complete' or an error code) and how long it took."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "A long story, please."}],
        "max_tokens": 3000,
        "stream": True,
    }
    started = time.monotonic()
    ending = "no [DONE]"
    async with client.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        if r.status_code != 200:
            return f"http {r.status_code}", time.monotonic() - started
        last: dict[str, object] = {}
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                choices = last.get("choices") or [{}]
                assert isinstance(choices, list)
                error = last.get("error")
                ending = (
                    str(error["code"]) if isinstance(error, dict) else f"complete:{choices[0].get('finish_reason')}"
                )
            elif line.startswith("data: "):
                last = json.loads(line.removeprefix("data: "))
    return ending, time.monotonic() - started


async def test_nats_restart_under_load(stack: Stack, own_bus: tuple[SecuredNats, str]) -> None:
    nats_server, base = own_bus
    async with httpx.AsyncClient(timeout=TIMEOUT_S + 30) as client:
        streams = [asyncio.create_task(_stream(client, base, stack.api_key)) for _ in range(6)]
        await asyncio.sleep(1.0)
        await asyncio.to_thread(nats_server.restart, down_s=1.0)
        results = await asyncio.gather(*streams)
        # Every request ended on its own, within the gateway's limit, with [DONE] and a clear ending.
        for ending, took in results:
            assert took < TIMEOUT_S + 5, (ending, took)
            assert ending.startswith("complete:") or ending in {
                "provider_lost",
                "provider_timeout",
                "request_timeout",
            }, results
        # And the pool comes back: a new request is answered within a few seconds.
        deadline = time.monotonic() + 20
        while True:
            r = await client.post(
                f"{base}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                headers={"Authorization": f"Bearer {stack.api_key}"},
            )
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        assert r.status_code == 200, r.text
    print("endings:", sorted(e for e, _ in results))
