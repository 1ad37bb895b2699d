"""A provider that dies or falls asleep mid-answer: the answer continues on another, unbroken."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from daemon.engine.synthetic import WORDS
from infra.components import DaemonChild, get_json, wait_model
from tests.support import logs
from tests.support.daemons import daemon_in_pool, spawn_daemon
from tests.support.ledger import written
from tests.support.stack import Stack, replica_of

MODEL = "tiny-llama-ha"
TOKENS = 2000
PROMPT = [{"role": "user", "content": "Tell me a long story about the sea."}]


@pytest.fixture
def pair(stack: Stack) -> Iterator[list[DaemonChild]]:
    """Two providers serving the same model."""
    daemons = [
        spawn_daemon(
            stack.home,
            nats=stack.nats,
            provider_id=f"ha-{name}-{time.monotonic_ns() % 100000}",
            model_id=MODEL,
            model_path=stack.model_path,
            env={"MP_HEARTBEAT_S": "0.5"},
        )
        for name in ("a", "b")
    ]
    try:
        for d in daemons:
            wait_model(stack.base_url, MODEL, timeout=60, daemon=d)
        deadline = time.monotonic() + 10
        while httpx.get(f"{stack.v1}/status").json()["models"] and _providers(stack) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        yield daemons
    finally:
        for d in daemons:
            if d.alive():
                d.proc.send_signal(signal.SIGCONT)
            d.stop()


def _providers(stack: Stack) -> int:
    return _providers_of(stack.base_url, MODEL)


def _busy(daemons: list[DaemonChild]) -> DaemonChild:
    for d in daemons:
        status, body = get_json(f"{d.admin_url}/admin/status", headers=d.admin_headers())
        assert status == 200
        assert isinstance(body, dict)
        if body["requests"]["in_flight"]:
            return d
    raise AssertionError("no daemon is running the request")


def _single_provider_answer(stack: Stack, **extra: Any) -> str:
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": TOKENS, "temperature": 0, **extra}
    r = httpx.post(f"{stack.v1}/chat/completions", json=body, headers=stack.auth(), timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def _stream_and_break(
    stack: Stack, daemons: list[DaemonChild], sig: signal.Signals, **extra: Any
) -> tuple[list[dict], float, str]:
    body = {
        "model": MODEL,
        "messages": PROMPT,
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    chunks: list[dict] = []
    victim_id = ""
    gaps: list[float] = []
    last = time.monotonic()
    with httpx.stream("POST", f"{stack.v1}/chat/completions", json=body, headers=stack.auth(), timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            if line == "data: [DONE]":
                break
            chunks.append(json.loads(line.removeprefix("data: ")))
            if len(chunks) == 20:
                victim = _busy(daemons)
                victim_id = victim.name
                victim.proc.send_signal(sig)
    return chunks, max(gaps[21:]), victim_id


def _text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_killed_provider_mid_stream_the_answer_continues_unbroken(stack: Stack, pair: list[DaemonChild]) -> None:
    chunks, longest_gap, victim = _stream_and_break(stack, pair, signal.SIGKILL)
    assert all("error" not in c for c in chunks), chunks[-3:]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == TOKENS
    # Two missed 0.5 s heartbeats, then the survivor re-reads the prompt and the tokens so far.
    assert longest_gap < 3.0, longest_gap
    logs.wait_event(stack.gateway.log_path, "failover", reason="provider_lost")
    # Exactly what one provider says on its own (temperature 0): nothing repeated, nothing missing.
    assert _text(chunks) == _single_provider_answer(stack)
    assert victim


def test_json_output_moves_to_another_provider_inside_its_grammar(stack: Stack, pair: list[DaemonChild]) -> None:
    # Long and exactly sized: 500 small numbers, so the answer outlasts the failover and ends with "stop".
    schema = {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 500, "maxItems": 500}
    fmt = {"type": "json_schema", "json_schema": {"name": "digits", "schema": schema}}
    chunks, _, victim = _stream_and_break(stack, pair, signal.SIGKILL, response_format=fmt)
    assert victim
    assert all("error" not in c for c in chunks), chunks[-3:]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == ["stop"]
    logs.wait_event(stack.gateway.log_path, "failover", reason="provider_lost")
    # The survivor's matcher read the tokens so far: valid JSON, the same as one provider's.
    values = json.loads(_text(chunks))
    assert len(values) == 500
    assert set(values) <= {1, 2, 3}
    assert _text(chunks) == _single_provider_answer(stack, response_format=fmt)


def test_sleeping_provider_mid_stream_the_answer_moves_and_it_stops_when_woken(
    stack: Stack, pair: list[DaemonChild]
) -> None:
    chunks, longest_gap, victim_name = _stream_and_break(stack, pair, signal.SIGSTOP)
    assert all("error" not in c for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == TOKENS
    assert longest_gap < 3.0, longest_gap
    assert _text(chunks) == _single_provider_answer(stack)
    # The Mac wakes up: it was told to cancel, so it stops and rejoins the pool.
    sleeper = next(d for d in pair if d.name == victim_name)
    sleeper.proc.send_signal(signal.SIGCONT)
    logs.wait_event(sleeper.log_path, "request_cancelled", timeout=10)
    deadline = time.monotonic() + 10
    while _providers(stack) < 2:
        assert time.monotonic() < deadline, "the woken provider did not rejoin"
        time.sleep(0.1)


def test_non_stream_request_survives_its_provider(stack: Stack, pair: list[DaemonChild]) -> None:
    import threading

    result: dict[str, httpx.Response] = {}
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": TOKENS, "temperature": 0}

    def ask() -> None:
        result["r"] = httpx.post(f"{stack.v1}/chat/completions", json=body, headers=stack.auth(), timeout=60)

    asker = threading.Thread(target=ask)
    asker.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            victim = _busy(pair)
            break
        except AssertionError:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    time.sleep(0.3)
    victim.proc.send_signal(signal.SIGKILL)
    asker.join(60)
    r = result["r"]
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == TOKENS
    assert r.json()["choices"][0]["message"]["content"] == _single_provider_answer(stack)


def test_the_next_turn_goes_to_the_provider_holding_the_conversation(stack: Stack, pair: list[DaemonChild]) -> None:
    from tests.support.accounts import query

    history = [{"role": "user", "content": "Hello there, tell me about the sea and the sky."}]
    served_by = []
    for turn in range(4):
        body = {"model": MODEL, "messages": history, "max_tokens": 24, "temperature": 0}
        r = httpx.post(f"{stack.v1}/chat/completions", json=body, headers=stack.auth(), timeout=60)
        assert r.status_code == 200, r.text
        written(stack.nats_url)
        (row,) = query(
            stack.database_url, "SELECT provider_id FROM usage_ledger WHERE request_id = $1", r.headers["x-request-id"]
        )
        served_by.append(row["provider_id"])
        if turn:
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        history += [r.json()["choices"][0]["message"], {"role": "user", "content": f"And then? ({turn})"}]
        time.sleep(1.2)  # the next heartbeat carries the conversation key
    assert len(set(served_by)) == 1, served_by


def test_a_paused_gateway_replica_gets_its_answer_continued_not_cut_short(stack: Stack) -> None:
    """A replica frozen for longer than its keepalive promise (3 intervals of 0.2 s): the provider stops its
    request (it cannot tell a paused replica from a dead one) and says so, and the thawed replica moves the
    answer to the other provider. Nothing else could fail it over here: this replica waits 20 heartbeat
    intervals (10 s) before it takes a provider for lost. Two synthetic providers at a token per 5 ms (no
    model to load): the answer is their fixed text, the same whoever continues it."""
    model, tokens = "synthetic-paced", 600
    paced = {"MP_SYNTHETIC_TOKEN_DELAY_S": "0.005", "MP_HEARTBEAT_S": "0.5"}
    env = {"MP_GATEWAY_KEEPALIVE_MS": "200", "MP_LOST_AFTER_INTERVALS": "20"}
    n = time.monotonic_ns() % 100000
    with (
        daemon_in_pool(stack, provider_id=f"paced-a-{n}", model_id=model, engine="synthetic", env=paced) as a,
        daemon_in_pool(stack, provider_id=f"paced-b-{n}", model_id=model, engine="synthetic", env=paced) as b,
        replica_of(stack, "gateway-paused", env) as (replica, base),
    ):
        wait_model(base, model, timeout=30)
        deadline = time.monotonic() + 10
        while _providers_of(base, model) < 2:
            assert time.monotonic() < deadline, "the replica never saw both providers"
            time.sleep(0.1)
        body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "stream": True}
        chunks: list[dict] = []
        victim: DaemonChild | None = None
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=stack.auth(), timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunks.append(json.loads(line.removeprefix("data: ")))
                if len(chunks) == 20:
                    victim = _busy([a, b])
                    replica.proc.send_signal(signal.SIGSTOP)
                    try:
                        logs.wait_event(victim.log_path, "gateway_lost_requests_stopped", timeout=10)
                    finally:
                        replica.proc.send_signal(signal.SIGCONT)
        assert victim is not None
        assert all("error" not in c for c in chunks), chunks[-3:]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
        assert finish == ["length"], "the answer ran to max_tokens, not to the stopped provider's end"
        assert _text(chunks) == "".join(WORDS[i % len(WORDS)] for i in range(tokens))
        logs.wait_event(replica.log_path, "failover", reason="gateway_unheard")


def _providers_of(base: str, model: str) -> int:
    """How many providers the gateway at `base` routes `model` to."""
    models = httpx.get(f"{base}/v1/status").json()["models"]
    return next((m["providers"] for m in models if m["id"] == model), 0)
