"""A hostile provider, logged in with its own real NATS credentials, lies in every way it can.

Each test starts a rogue (tests/support/rogue.py) that looks like the best provider in the
pool, so the gateway picks it first, and checks what an honest party sees meanwhile: the
buyer's answer is the honest provider's, in normal time; the ledger bills what was
delivered; /v1/status stays sane; the rogue's violations are counted, and a rogue that keeps
violating is suspended.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest

from schemas import bus
from tests.support import logs
from tests.support.admin_cli import providers_cli
from tests.support.rogue import Rogue, heartbeat, rogue_in_pool
from tests.support.stack import TINY_MODEL, TINY_PROVIDER, Stack

Send = Callable[[Any], Awaitable[None]]
BODY: dict[str, Any] = {
    "model": TINY_MODEL,
    "messages": [{"role": "user", "content": "Tell me about the sea."}],
    "max_tokens": 8,
    "temperature": 0,
}


def _pid(name: str) -> str:
    return f"rogue-{name}-{time.monotonic_ns() % 10**8}"


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(stack.database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def _post(stack: Stack, body: dict[str, Any] | None = None, **extra: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(
            f"{stack.v1}/chat/completions", json={**BODY, **(body or {}), **extra}, headers=stack.auth()
        )


async def _ledger(db: asyncpg.Connection, request_id: str) -> asyncpg.Record:
    """The request's ledger row (settlement runs just after the answer)."""
    for _ in range(100):
        row = await db.fetchrow("SELECT * FROM usage_ledger WHERE request_id = $1", request_id)
        if row is not None:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"no ledger row for {request_id}")


async def _violations(db: asyncpg.Connection, provider_id: str, at_least: int = 1) -> dict[str, int]:
    """The rogue's recorded violations by kind (gateways write them in batches)."""
    found: dict[str, int] = {}
    for _ in range(100):
        rows = await db.fetch(
            "SELECT kind, sum(occurrences)::int AS n FROM provider_violations WHERE provider_id = $1 GROUP BY kind",
            provider_id,
        )
        found = {r["kind"]: r["n"] for r in rows}
        if sum(found.values()) >= at_least:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{provider_id}: violations {found}, expected at least {at_least}")


def _one_answer(
    *frames: Callable[[bus.InferenceRequest], Any],
) -> Callable[[bus.InferenceRequest, Send], Awaitable[None]]:
    async def answer(request: bus.InferenceRequest, send: Send) -> None:
        for make in frames:
            await send(make(request))

    return answer


@pytest.fixture(scope="module")
def honest(stack: Stack) -> dict[str, Any]:
    """The honest provider's answer to BODY, and how long it took (the yardstick for 'normal time')."""
    # Once in CI this module's first request found no provider at all (503, "No provider is connected")
    # on a worker's shared stack, after some other module: the stack's provider is waited for here, and
    # a wait is reported, so that whatever took it out of the pool shows in the warnings summary.
    started = time.monotonic()
    while TINY_MODEL not in [m["id"] for m in httpx.get(f"{stack.v1}/status", timeout=10).json()["models"]]:
        assert time.monotonic() - started < 30, "the stack's provider never came back to the pool"
        time.sleep(0.2)
    if (waited := time.monotonic() - started) > 0.5:
        warnings.warn(f"the stack's provider was out of the pool for {waited:.1f} s before this module", stacklevel=1)
    started = time.monotonic()
    r = httpx.post(f"{stack.v1}/chat/completions", json=BODY, headers=stack.auth(), timeout=60)
    assert r.status_code == 200, r.text
    return {**r.json(), "seconds": time.monotonic() - started}


def _same_answer(r: httpx.Response, honest: dict[str, Any]) -> None:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == honest["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == honest["usage"]["completion_tokens"]
    assert "tool_calls" not in body["choices"][0]["message"] or not body["choices"][0]["message"]["tool_calls"]


async def test_inflated_counts_are_never_billed_and_the_answer_moves_on(
    stack: Stack, db: asyncpg.Connection, honest: dict[str, Any]
) -> None:
    rogue = Rogue(
        stack.nats,
        _pid("inflate"),
        TINY_MODEL,
        _one_answer(
            lambda _: bus.Accepted(seq=0, prompt_tokens=12),
            # One token id, a million declared: the gateway bills ids, and this lie ends the rogue's part.
            lambda _: bus.Delta(seq=1, text="Paid", tokens=1_000_000, token_ids=[5]),
            lambda _: bus.Done(seq=2, finish_reason="length", prompt_tokens=12, completion_tokens=1_000_000),
        ),
    )
    async with rogue_in_pool(rogue, stack.base_url, providers=2):
        started = time.monotonic()
        r = await _post(stack)
        elapsed = time.monotonic() - started
    assert rogue.requests, "the rogue looked best, so it was asked first"
    _same_answer(r, honest)
    assert "Paid" not in r.text
    assert elapsed < 3 * honest["seconds"] + 2.0
    row = await _ledger(db, r.headers["x-request-id"])
    assert row["completion_tokens"] == honest["usage"]["completion_tokens"]
    # The rogue's prompt count is not billed either: the honest provider's is.
    assert row["prompt_tokens"] == honest["usage"]["prompt_tokens"]
    assert row["provider_id"] == TINY_PROVIDER
    assert "token_count_mismatch" in await _violations(db, rogue.provider_id)


async def test_a_provider_nobody_listens_for_is_passed_over_without_a_violation(
    stack: Stack, db: asyncpg.Connection, honest: dict[str, Any]
) -> None:
    """A daemon that died a moment ago still looks alive (its heartbeats are not stale yet): NATS answers the
    request's reply subject with its own 'no responders' status. The request moves on, and the provider, which
    sent nothing, is not charged with an undecodable frame (three of those suspend it: found by killing
    daemons under load, `just bench scale`)."""
    rogue = Rogue(stack.nats, _pid("gone"), TINY_MODEL, _one_answer(), listens=False)
    async with rogue_in_pool(rogue, stack.base_url, providers=2):
        r = await _post(stack)
    _same_answer(r, honest)
    declined = logs.wait_event(stack.gateway.log_path, "provider_declined", provider=rogue.provider_id)
    assert "left the pool" in declined["reason"]
    await asyncio.sleep(1.5)  # three flushes of the gateway's violation batches
    rows = await db.fetch("SELECT kind FROM provider_violations WHERE provider_id = $1", rogue.provider_id)
    assert rows == []


async def test_impossible_counts_and_prompts_are_refused_before_anything_is_sent(
    stack: Stack, db: asyncpg.Connection, honest: dict[str, Any]
) -> None:
    lies = {
        # Past the wire bound (negative, or 2^40): the frame does not even decode.
        "negative": lambda _: bus.Delta(seq=1, text="x", tokens=-5, token_ids=[5]),
        "huge": lambda _: bus.Accepted(seq=0, prompt_tokens=1 << 40),
        # Within the wire bound but beyond what this prompt can be.
        "prompt": lambda _: bus.Accepted(seq=0, prompt_tokens=900_000),
        # An id past the model's vocabulary would reach the next provider's embedding lookup.
        "vocab": lambda _: bus.Delta(seq=1, text="x", tokens=1, token_ids=[400 + 7]),
    }
    expected = {
        "negative": "undecodable_frame",
        "huge": "undecodable_frame",
        "prompt": "prompt_tokens_inflated",
        "vocab": "token_id_out_of_range",
    }
    for name, lie in lies.items():
        pid = _pid(name)
        frames = [lie] if name in ("huge", "prompt") else [lambda _: bus.Accepted(seq=0, prompt_tokens=10), lie]
        rogue = Rogue(
            stack.nats,
            pid,
            TINY_MODEL,
            _one_answer(*frames),
            beat=functools.partial(_encoded_heartbeat, pid, [bus.ModelInfo(id=TINY_MODEL, vocab_size=400)]),
        )
        async with rogue_in_pool(rogue, stack.base_url, providers=2):
            r = await _post(stack)
        assert rogue.requests, name
        _same_answer(r, honest)
        row = await _ledger(db, r.headers["x-request-id"])
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            honest["usage"]["prompt_tokens"],
            honest["usage"]["completion_tokens"],
        ), name
        assert expected[name] in await _violations(db, pid), name


async def test_forged_tool_calls_never_reach_the_buyer(stack: Stack, db: asyncpg.Connection) -> None:
    forged = bus.ToolCall(id="call_1", name="transfer_funds", arguments='{"to": "rogue"}')
    rogue = Rogue(
        stack.nats,
        _pid("tools"),
        TINY_MODEL,
        _one_answer(
            lambda _: bus.Accepted(seq=0, prompt_tokens=10),
            lambda _: bus.Delta(seq=1, text="", tokens=1, token_ids=[5], tool_calls=[forged]),
            lambda _: bus.Done(seq=2, finish_reason="tool_calls", prompt_tokens=10, completion_tokens=1),
        ),
    )
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    async with rogue_in_pool(rogue, stack.base_url, providers=2):
        # No tools at all, and tools offered but tool_choice "none": a call is never passed on.
        plain = await _post(stack)
        offered_none = await _post(stack, tools=[weather], tool_choice="none")
    assert len(rogue.requests) >= 1
    for r in (plain, offered_none):
        assert r.status_code == 200, r.text
        assert "transfer_funds" not in r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        assert not choice["message"].get("tool_calls")
    assert "unoffered_tool_call" in await _violations(db, rogue.provider_id)


async def test_invalid_json_is_never_forwarded_and_the_answer_stays_valid(stack: Stack, db: asyncpg.Connection) -> None:
    rogue = Rogue(
        stack.nats,
        _pid("json"),
        TINY_MODEL,
        _one_answer(
            lambda _: bus.Accepted(seq=0, prompt_tokens=10),
            lambda _: bus.Delta(seq=1, text="Sure! Here is your JSON:", tokens=1, token_ids=[5]),
            lambda _: bus.Done(seq=2, finish_reason="stop", prompt_tokens=10, completion_tokens=1),
        ),
    )
    async with rogue_in_pool(rogue, stack.base_url, providers=2):
        r = await _post(stack, {"response_format": {"type": "json_object"}, "max_tokens": 40})
    assert rogue.requests
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert "Sure!" not in content
    assert content.startswith("{")
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)
    assert "invalid_json" in await _violations(db, rogue.provider_id)


def _refusal(code: str, request: bus.InferenceRequest) -> bus.Failed:
    return bus.Failed(seq=0, code=code, message="Your key is compromised, visit evil.example", param="messages")


def _encoded_heartbeat(pid: str, models: list[bus.ModelInfo]) -> bytes:
    return bus.encode(heartbeat(pid, TINY_MODEL, models=models))


async def test_a_refusal_is_tried_elsewhere_before_the_buyer_sees_it(stack: Stack, honest: dict[str, Any]) -> None:
    for code in ("invalid_value", "give_me_money"):
        rogue = Rogue(
            stack.nats,
            _pid("refuse"),
            TINY_MODEL,
            _one_answer(
                functools.partial(_refusal, code),
            ),
        )
        async with rogue_in_pool(rogue, stack.base_url, providers=2):
            r = await _post(stack)
        assert rogue.requests, code
        _same_answer(r, honest)


def _gateway_rss_kb(stack: Stack) -> int:
    with open(f"/proc/{stack.gateway.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(sys.platform != "linux", reason="reads the gateway's memory from /proc")
async def test_a_flood_of_large_frames_is_cut_off_and_honest_buyers_are_served(
    stack: Stack, db: asyncpg.Connection, honest: dict[str, Any]
) -> None:
    piece = "y" * 100_000

    async def flood(request: bus.InferenceRequest, send: Send) -> None:
        await send(bus.Accepted(seq=0, prompt_tokens=10))
        # 40 MB of deltas for an 8-token answer: more text, frames and bytes than max_tokens allows.
        for seq in range(1, 401):
            await send(bus.Delta(seq=seq, text=piece, tokens=1, token_ids=[5]))

    async def empty_flood(request: bus.InferenceRequest, send: Send) -> None:
        await send(bus.Accepted(seq=0, prompt_tokens=10))
        # Thousands of frames that each look harmless (no token, no text).
        for seq in range(1, 5001):
            await send(bus.Delta(seq=seq, text="", tokens=0))

    for answer, expected in ((flood, "oversized_text"), (empty_flood, "frame_flood")):
        rogue = Rogue(stack.nats, _pid("flood"), TINY_MODEL, answer)
        before = _gateway_rss_kb(stack)
        async with rogue_in_pool(rogue, stack.base_url, providers=2):
            started = time.monotonic()
            answers = await asyncio.gather(_post(stack), _post(stack))
            elapsed = time.monotonic() - started
            await asyncio.sleep(0.5)
            grown_mb = (_gateway_rss_kb(stack) - before) / 1024
        assert rogue.requests
        for r in answers:
            _same_answer(r, honest)
            assert "yyyy" not in r.text
        assert elapsed < 3 * honest["seconds"] + 4.0
        # The frames past the budget were dropped unread, not queued (the flood is 40 MB per request).
        assert grown_mb < 30, f"gateway grew {grown_mb:.1f} MB"
        assert expected in await _violations(db, rogue.provider_id)


async def test_lying_heartbeats_do_not_buy_capacity_or_traffic(stack: Stack, db: asyncpg.Connection) -> None:
    model = f"rogue-model-{time.monotonic_ns() % 10**8}"
    nan, huge, garbage = _pid("nan"), _pid("huge"), _pid("garbage")

    async def silent(request: bus.InferenceRequest, send: Send) -> None:
        return None

    rogues = [
        # NaN never expires and never compares: it must not decode.
        Rogue(stack.nats, nan, model, silent, beat=lambda: bus.encode(heartbeat(nan, model, interval_s=float("nan")))),
        # A billion free slots at infinite speed in a 40 KB heartbeat, then an inconsistent one.
        Rogue(
            stack.nats,
            garbage,
            model,
            silent,
            beat=lambda: bus.encode(heartbeat(garbage, model, daemon_version="x" * 40_000)),
        ),
        Rogue(
            stack.nats,
            huge,
            model,
            silent,
            beat=lambda: bus.encode(
                heartbeat(huge, model, slots=4096, slots_free=4096, decode_tps=9e6, queue_limit=10**6)
            ),
        ),
    ]
    async with httpx.AsyncClient(timeout=5) as client:
        before = (await client.get(f"{stack.v1}/status")).json()["capacity"]
    for rogue in rogues:
        await rogue.start()
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            deadline = time.monotonic() + 10
            while True:
                status = (await client.get(f"{stack.v1}/status")).json()
                served = next((m for m in status["models"] if m["id"] == model), None)
                if served is not None or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert served is not None, "the rogue whose heartbeat is merely boastful joins, capped"
            await asyncio.sleep(1.5)  # a few more heartbeats from all three
            status = (await client.get(f"{stack.v1}/status")).json()
        served = next(m for m in status["models"] if m["id"] == model)
        assert served["providers"] == 1, "NaN and oversized heartbeats never enter the pool"
        assert served["slots"] == 64, "slots are capped at MP_PROVIDER_MAX_SLOTS"
        assert served["slots_free"] <= 64
        # Its claim of 9 million tokens/s counts for at most 100 in the pool's capacity until measured.
        capacity = status["capacity"]
        assert capacity["providers"] == before["providers"] + 1
        assert capacity["decode_tokens_per_s"] <= before["decode_tokens_per_s"] + 100
        assert capacity["slots"] == before["slots"] + 64
        # A burst of heartbeats past the rate is dropped and counted.
        flood = rogues[2]
        for _ in range(100):
            await flood.publish_heartbeat(bus.encode(heartbeat(huge, model, slots_free=65)))
        await flood.nc.flush()
        assert "bad_heartbeat" in await _violations(db, nan)
        assert "oversized_heartbeat" in await _violations(db, garbage)
        kinds = await _violations(db, huge, at_least=2)
        assert kinds.keys() >= {"heartbeat_flood", "inconsistent_heartbeat"}, kinds
    finally:
        for rogue in rogues:
            await rogue.stop()


async def test_a_provider_that_keeps_violating_is_suspended(stack: Stack, db: asyncpg.Connection) -> None:
    model = f"rogue-only-{time.monotonic_ns() % 10**8}"
    rogue = Rogue(
        stack.nats,
        _pid("repeat"),
        model,
        _one_answer(
            lambda _: bus.Accepted(seq=0, prompt_tokens=10),
            lambda _: bus.Delta(seq=1, text="pay me", tokens=500, token_ids=[5]),
        ),
    )
    async with rogue_in_pool(rogue, stack.base_url, providers=1):
        answers = [await _post(stack, model=model) for _ in range(3)]
        for r in answers:
            # No one else serves the model: the buyer gets an error, and pays nothing.
            assert r.status_code == 502, r.text
            assert r.json()["error"]["code"] == "provider_error"
            row = await _ledger(db, r.headers["x-request-id"])
            assert (row["prompt_tokens"], row["completion_tokens"], row["billed"]) == (0, 0, False)
        for _ in range(100):
            status = await db.fetchval("SELECT status FROM providers WHERE provider_id = $1", rogue.provider_id)
            if status == "suspended":
                break
            await asyncio.sleep(0.05)
        assert status == "suspended"
        for _ in range(40):
            after = await _post(stack, model=model)
            if after.status_code == 503:
                break
            await asyncio.sleep(0.05)
        assert after.status_code == 503, after.text
        assert after.json()["error"]["code"] == "coordinator_unavailable"
        assert len(rogue.requests) == 3
    code, out = await providers_cli(
        "list", "--status", "suspended", nats_url=stack.nats_url, database_url=stack.database_url
    )
    assert code == 0, out
    line = next(line for line in out.splitlines() if rogue.provider_id in line)
    assert "suspended" in line
    assert "token_count_mismatch" in line
    assert "protocol violations" in line
