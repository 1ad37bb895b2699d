"""A provider lost mid-stream, with no other to continue: every surface ends its stream with its
own protocol's error event, never a silent cut."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from infra.components import DaemonChild
from tests.support.daemons import daemon_in_pool
from tests.support.stack import Stack

MODEL = "tiny-llama-sleepy"
LONG = 30_000


@pytest.fixture(scope="module")
def sleepy(stack: Stack) -> Iterator[DaemonChild]:
    with daemon_in_pool(stack, provider_id="sleepy-mac", model_id=MODEL) as daemon:
        try:
            yield daemon
        finally:
            daemon.proc.send_signal(signal.SIGCONT)  # a stopped process would not hear its SIGTERM


def _stream_until_lost(stack: Stack, daemon: DaemonChild, path: str, body: dict[str, Any]) -> list[str]:
    """Stream, put the provider to sleep after a few events (a Mac closing its lid), return all lines."""
    lines: list[str] = []
    try:
        with httpx.stream("POST", f"{stack.v1}{path}", json=body, headers=stack.auth(), timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 12:
                    daemon.proc.send_signal(signal.SIGSTOP)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    # Back in the pool before the next surface tries.
    deadline = time.monotonic() + 20
    while MODEL not in [m["id"] for m in httpx.get(f"{stack.v1}/status").json()["models"]]:
        assert time.monotonic() < deadline, "the woken provider never came back"
        time.sleep(0.2)
    return lines


def _data(lines: list[str]) -> list[Any]:
    return [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]


Check = Callable[[list[str]], None]


def _chat(lines: list[str]) -> None:
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    last = _data(lines)[-1]
    assert last["choices"][0]["finish_reason"] == "error"
    assert last["error"]["code"] == "provider_lost"


def _completion(lines: list[str]) -> None:
    assert "data: [DONE]" in lines[-2:]
    last = _data(lines)[-1]
    assert last["object"] == "text_completion"
    assert last["choices"][0]["finish_reason"] == "error"
    assert last["error"]["code"] == "provider_lost"


def _message(lines: list[str]) -> None:
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert events[-1] == "error"
    assert "message_stop" not in events
    error = _data(lines)[-1]
    assert error["type"] == "error"
    assert error["error"]["type"] == "api_error"
    assert "provider_lost" in error["error"]["message"]


def _response(lines: list[str]) -> None:
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert events[-2:] == ["error", "response.failed"]
    error, failed = _data(lines)[-2:]
    assert error["code"] == "provider_lost"
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "provider_lost"
    numbers = [d["sequence_number"] for d in _data(lines)]
    assert numbers == list(range(len(numbers)))


@pytest.mark.parametrize(
    ("path", "body", "check"),
    [
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG}, _chat),
        ("/completions", {"prompt": "Once upon a time", "max_tokens": LONG}, _completion),
        ("/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG}, _message),
        ("/responses", {"input": "hi", "max_output_tokens": LONG}, _response),
    ],
    ids=["chat", "completions", "messages", "responses"],
)
def test_lost_provider_ends_the_stream_in_band(
    stack: Stack, sleepy: DaemonChild, path: str, body: dict[str, Any], check: Check
) -> None:
    lines = _stream_until_lost(stack, sleepy, path, {"model": MODEL, "stream": True, **body})
    check(lines)
