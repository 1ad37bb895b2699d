"""Engine depth on a real daemon (tiny model): batching, prompt cache, sampling fields, admission.

Requests go to the daemon's local OpenAI-compatible API, or straight over NATS
(no gateway) where the bus frames themselves are the point.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.components import DaemonChild, wait_model
from schemas import bus
from tests.support import logs
from tests.support.daemons import bus_call, bus_request, chat, running_daemon, sse_payloads, status, stream_text
from tests.support.script_model import CALL_MARKUP, CALL_NAME, write_script_model
from tests.support.stack import Stack
from tests.support.tool_model import WEATHER_TOOL, write_tool_model

MODEL = "tiny-llama-engine"
PROVIDER = "engine-mac"


@pytest.fixture(scope="module")
def daemon(stack: Stack) -> Iterator[DaemonChild]:
    with running_daemon(
        stack.home, nats=stack.nats, provider_id=PROVIDER, model_id=MODEL, model_path=stack.model_path
    ) as d:
        yield d


def _text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    content: str = r.json()["choices"][0]["message"]["content"]
    return content


PROMPTS = ["Tell me about the sea.", "Write a poem.", "Numbers please.", "Hello there, friend."]


async def _post(client: httpx.AsyncClient, daemon: DaemonChild, content: str, **body: Any) -> dict[str, Any]:
    payload = {"model": "x", "messages": [{"role": "user", "content": content}], "temperature": 0, **body}
    r = await client.post(f"{daemon.api_url}/v1/chat/completions", json=payload)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def test_concurrent_requests_decode_together_with_the_same_text(daemon: DaemonChild) -> None:
    tokens = 400
    async with httpx.AsyncClient(timeout=120) as client:
        await _post(client, daemon, "warm up", max_tokens=8)
        start = (await asyncio.to_thread(status, daemon))["batch"]
        one_by_one = [await _post(client, daemon, p, max_tokens=tokens) for p in PROMPTS]
        middle = (await asyncio.to_thread(status, daemon))["batch"]
        together = await asyncio.gather(*(_post(client, daemon, p, max_tokens=tokens) for p in PROMPTS))
        end = (await asyncio.to_thread(status, daemon))["batch"]
    # Greedy text is the same whether a request decodes alone or in a batch.
    assert [r["choices"][0]["message"]["content"] for r in together] == [
        r["choices"][0]["message"]["content"] for r in one_by_one
    ]
    assert all(r["usage"]["completion_tokens"] == tokens for r in together)
    # What the worker recorded, not the wall clock: alone, each decode step made one token; together,
    # the four shared steps (a step decodes every row of the batch), all four rows at once at the peak.
    alone_tokens, alone_steps = (middle[k] - start[k] for k in ("generated_tokens", "decode_steps"))
    batch_tokens, batch_steps = (end[k] - middle[k] for k in ("generated_tokens", "decode_steps"))
    assert alone_tokens == batch_tokens == len(PROMPTS) * tokens
    assert alone_steps == alone_tokens
    assert batch_steps < batch_tokens / 2, (batch_steps, batch_tokens)
    assert end["peak_rows"] == len(PROMPTS)
    print(f"\ntiny model, 4 x {tokens} tokens: {alone_steps} decode steps one by one, {batch_steps} together")


def test_a_cancelled_request_leaves_the_batch_at_once(daemon: DaemonChild) -> None:
    body = {"model": "x", "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 30_000, "stream": True}
    with httpx.stream("POST", f"{daemon.api_url}/v1/chat/completions", json=body, timeout=60) as r:
        request_id = r.headers["x-request-id"]
        for n, _ in enumerate(r.iter_lines()):
            if n > 8:
                break
    closed_at = time.time()
    done = logs.wait_event(daemon.log_path, "local_request_done", request_id=request_id)
    assert done["finish"] in ("cancelled", "client_closed")
    assert logs.timestamp(done) - closed_at < 1.0
    deadline = time.monotonic() + 2
    while status(daemon)["batch"]["active_rows"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert status(daemon)["batch"]["active_rows"] == 0
    assert status(daemon)["requests"]["in_flight"] == 0


async def test_prompt_cache_serves_the_second_turn(daemon: DaemonChild, stack: Stack) -> None:
    first = await bus_call(stack.nats, PROVIDER, bus_request("cache-turn-1", MODEL, "Tell me a story.", max_tokens=20))
    done1 = first[-1]
    assert isinstance(done1, bus.Done), first
    reply = "".join(f.text for f in first if isinstance(f, bus.Delta))
    turn2 = [
        bus.BusMessage(role="user", content="Tell me a story."),
        bus.BusMessage(role="assistant", content=reply),
        bus.BusMessage(role="user", content="And then?"),
    ]
    second = await bus_call(stack.nats, PROVIDER, bus_request("cache-turn-2", MODEL, messages=turn2))
    done2 = second[-1]
    assert isinstance(done2, bus.Done), second
    # At least the whole first prompt came from the cache (its reply too, when it re-tokenizes the same).
    assert done2.cached_tokens >= done1.prompt_tokens, (done1, done2)
    assert done2.cached_tokens < done2.prompt_tokens
    # The local API reports it in OpenAI's field.
    r = chat(daemon, max_tokens=2, temperature=0, messages=[{"role": "user", "content": "Tell me a story."}])
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    cache = status(daemon)["prompt_cache"]
    assert cache["hits"] >= 2
    assert cache["entries"] >= 1
    assert cache["bytes"] > 0


async def test_a_seed_gives_the_same_text_alone_or_in_a_batch(daemon: DaemonChild) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        alone = await _post(client, daemon, "Seeded.", max_tokens=40, temperature=1.0, seed=7)
        crowd = [_post(client, daemon, p, max_tokens=60, temperature=1.0) for p in PROMPTS]
        batched, *_ = await asyncio.gather(
            _post(client, daemon, "Seeded.", max_tokens=40, temperature=1.0, seed=7), *crowd
        )
        other = await _post(client, daemon, "Seeded.", max_tokens=40, temperature=1.0, seed=8)
    text = alone["choices"][0]["message"]["content"]
    assert batched["choices"][0]["message"]["content"] == text
    assert other["choices"][0]["message"]["content"] != text


def test_every_sampling_field_changes_the_output(daemon: DaemonChild) -> None:
    greedy = _text(chat(daemon, max_tokens=40, temperature=0))
    hot = {"temperature": 1.5, "seed": 3}
    assert _text(chat(daemon, max_tokens=40, **hot)) != greedy
    # Filters that leave only the most likely token make hot sampling greedy again.
    assert _text(chat(daemon, max_tokens=40, top_k=1, **hot)) == greedy
    assert _text(chat(daemon, max_tokens=40, top_p=0.001, **hot)) == greedy
    assert _text(chat(daemon, max_tokens=40, min_p=1.0, **hot)) == greedy
    for penalty in ({"repetition_penalty": 2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        assert _text(chat(daemon, max_tokens=40, temperature=0, **penalty)) != greedy, penalty
    # logit_bias: a +100 on one token makes it the only choice.
    forced = chat(daemon, max_tokens=5, temperature=0, logit_bias={"65": 100}, logprobs=True).json()
    assert [t["token"] for t in forced["choices"][0]["logprobs"]["content"]] == [
        forced["choices"][0]["logprobs"]["content"][0]["token"]
    ] * 5
    assert forced["choices"][0]["message"]["content"] == forced["choices"][0]["logprobs"]["content"][0]["token"] * 5
    # max_completion_tokens wins over max_tokens.
    assert chat(daemon, max_tokens=20, max_completion_tokens=3).json()["usage"]["completion_tokens"] == 3


def test_logprobs_and_top_logprobs(daemon: DaemonChild) -> None:
    body = chat(daemon, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 6
    for entry in content:
        assert entry["logprob"] <= 0
        tops = entry["top_logprobs"]
        assert len(tops) == 3
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(tops[0]["logprob"], entry["logprob"], abs_tol=1e-5)
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
    assert (
        "".join(bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace"))
        == body["choices"][0]["message"]["content"]
    )
    # Streamed, each delta carries the logprobs of its tokens.
    r = chat(daemon, max_tokens=6, temperature=0, logprobs=True, stream=True)
    streamed = [
        e
        for p in sse_payloads(r.text)[1:-1]
        for e in ((json.loads(p)["choices"][0].get("logprobs") or {}).get("content") or [])
    ]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 3.0),
        ("top_p", 0.0),
        ("top_k", -1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("top_logprobs", 25),
        ("max_tokens", 0),
        ("max_completion_tokens", -5),
        ("n", 2),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("logit_bias", {"999999": 1.0}),
        ("tool_choice", "sometimes"),
        ("reasoning_effort", "extreme"),
    ],
)
def test_out_of_range_values_are_400_naming_the_field(daemon: DaemonChild, field: str, value: Any) -> None:
    r = chat(daemon, **{"max_tokens": 4, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field, error
    assert error["type"] == "invalid_request_error"


def test_top_logprobs_needs_logprobs(daemon: DaemonChild) -> None:
    r = chat(daemon, max_tokens=2, top_logprobs=2)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "top_logprobs"


async def test_the_daemon_validates_bus_requests_too(daemon: DaemonChild, stack: Stack) -> None:
    frames = await bus_call(stack.nats, PROVIDER, bus_request("bad-temp", MODEL, temperature=9.0))
    (failed,) = frames
    assert isinstance(failed, bus.Failed)
    assert (failed.code, failed.param, failed.retryable) == ("invalid_value", "temperature", False)


def test_stop_strings_across_token_boundaries(daemon: DaemonChild) -> None:
    free = _text(chat(daemon, max_tokens=30, temperature=0))
    stop = free[10:14]
    expected = free[: free.index(stop)]
    r = chat(daemon, max_tokens=30, temperature=0, stop=[stop, "never-appears"])
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert _text(r) == expected
    streamed = chat(daemon, max_tokens=30, temperature=0, stop=stop, stream=True)
    assert stream_text(sse_payloads(streamed.text)) == expected


def test_local_api_surface(daemon: DaemonChild) -> None:
    assert httpx.get(f"{daemon.api_url}/health").json()["status"] == "healthy"
    models = httpx.get(f"{daemon.api_url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    r = httpx.post(
        f"{daemon.api_url}/v1/completions", json={"model": "x", "prompt": "The quick", "max_tokens": 7}, timeout=30
    )
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    assert body["usage"]["completion_tokens"] == 7
    assert body["choices"][0]["finish_reason"] == "length"
    streamed = httpx.post(
        f"{daemon.api_url}/v1/completions",
        json={"model": "x", "prompt": "The quick", "max_tokens": 7, "stream": True, "temperature": 0},
        timeout=30,
    )
    payloads = sse_payloads(streamed.text)
    assert payloads[-1] == "[DONE]"
    text = "".join(json.loads(p)["choices"][0]["text"] for p in payloads[:-1])
    greedy = httpx.post(
        f"{daemon.api_url}/v1/completions",
        json={"model": "x", "prompt": "The quick", "max_tokens": 7, "temperature": 0},
        timeout=30,
    ).json()
    assert text == greedy["choices"][0]["text"]
    # echo: the prompt comes back first, streamed or not; what the gateway refuses, so does the daemon.
    echoed = {"model": "x", "prompt": "The quick", "max_tokens": 7, "temperature": 0, "echo": True}
    body = httpx.post(f"{daemon.api_url}/v1/completions", json=echoed, timeout=30).json()
    assert body["choices"][0]["text"] == "The quick" + text
    streamed = httpx.post(f"{daemon.api_url}/v1/completions", json={**echoed, "stream": True}, timeout=30)
    assert "".join(json.loads(p)["choices"][0]["text"] for p in sse_payloads(streamed.text)[:-1]) == "The quick" + text
    for refused, param in (({"suffix": "!"}, "suffix"), ({"echo": True, "logprobs": 1}, "echo")):
        r = httpx.post(f"{daemon.api_url}/v1/completions", json={"model": "x", "prompt": "a", **refused}, timeout=30)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == param
        assert r.json()["error"]["code"] == "unsupported_value"
    bias = httpx.post(
        f"{daemon.api_url}/v1/chat/completions",
        json={"model": "x", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}},
        timeout=30,
    )
    assert bias.status_code == 400
    assert bias.json()["error"]["param"] == "logit_bias"
    # The chat stream has OpenAI's framing.
    r = chat(daemon, max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = [json.loads(p) for p in sse_payloads(r.text)[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    bad = httpx.post(
        f"{daemon.api_url}/v1/chat/completions",
        content=b"{nope",
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_json"


def test_local_api_answers_without_waiting_for_delayed_acks(daemon: DaemonChild) -> None:
    # uvicorn writes a response's headers and body apart; on a socket without TCP_NODELAY the body
    # waits for the client's delayed ACK: 40 ms on every local request (Linux). Twenty on one keep-alive
    # connection took 880 ms that way; they take about 10 now (the bound leaves room for a busy machine).
    with httpx.Client(base_url=daemon.api_url) as client:
        client.get("/v1/models")
        started = time.perf_counter()
        for _ in range(20):
            assert client.get("/v1/models").status_code == 200
        elapsed = time.perf_counter() - started
    assert elapsed < 0.4, f"20 requests took {elapsed * 1000:.0f} ms"


# ---- a daemon on a small memory budget, and a model with generation defaults --------


@pytest.fixture(scope="module")
def budget_model(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The tiny model with a chat template that speaks tools (mlx-lm's json_tools parser).
    folder = write_tool_model(stack.model_path, tmp_path_factory.mktemp("models") / "tiny-llama-greedy")
    # The author's defaults: greedy unless the request says otherwise.
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.0}))
    return folder


@pytest.fixture(scope="module")
def budget_daemon(stack: Stack, budget_model: Path) -> Iterator[DaemonChild]:
    folder = budget_model
    with running_daemon(
        stack.home,
        nats=stack.nats,
        provider_id="budget-mac",
        model_id="tiny-llama-budget",
        model_path=folder,
        # Weights (0.4 MB) + 256 MiB of transients + room for ~700 tokens of KV cache.
        env={"MP_MEMORY_BUDGET_GB": "0.2507"},
    ) as d:
        yield d


def test_context_over_budget_is_refused_up_front(budget_daemon: DaemonChild) -> None:
    ceiling = status(budget_daemon)["admission"]["max_safe_context"]
    assert 400 < ceiling < 1000, ceiling
    r = chat(budget_daemon, max_tokens=ceiling)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("memory_admission", "context_over_budget", "max_tokens")
    assert str(ceiling) in error["message"]
    assert chat(budget_daemon, max_tokens=20).status_code == 200
    # Without an explicit max_tokens the answer is clipped to what fits instead.
    r = chat(budget_daemon)
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= ceiling


async def test_context_over_budget_on_the_bus(budget_daemon: DaemonChild, stack: Stack) -> None:
    ceiling = status(budget_daemon)["admission"]["max_safe_context"]
    request = bus_request("over-budget", "tiny-llama-budget", max_tokens=ceiling, max_tokens_explicit=True)
    (failed,) = await bus_call(stack.nats, "budget-mac", request)
    assert isinstance(failed, bus.Failed)
    assert (failed.code, failed.param, failed.retryable) == ("context_over_budget", "max_tokens", False)


def test_generation_config_defaults_apply_when_a_field_is_omitted(budget_daemon: DaemonChild) -> None:
    explicit = _text(chat(budget_daemon, max_tokens=30, temperature=0))
    # No temperature in the request: the model's generation_config.json says greedy.
    assert _text(chat(budget_daemon, max_tokens=30)) == explicit
    assert _text(chat(budget_daemon, max_tokens=30)) == explicit
    # An explicit value still wins.
    assert _text(chat(budget_daemon, max_tokens=30, temperature=1.5, seed=1)) != explicit


def test_tool_round_trip_on_the_local_api(budget_daemon: DaemonChild, budget_model: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
    ]
    r = chat(budget_daemon, max_tokens=5, messages=messages, tools=[WEATHER_TOOL], tool_choice="auto")
    assert r.status_code == 200, r.text
    # The prompt the model saw is the template's rendering of the whole round trip.
    tokenizer = load_tokenizer(budget_model, eos_token_ids=[2])
    rendered = copy.deepcopy(messages)
    # As the daemon hands them to the template: no None content, arguments as a mapping.
    rendered[1]["content"] = ""
    rendered[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    expected = tokenizer.apply_chat_template(rendered, tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert r.json()["usage"]["prompt_tokens"] == len(expected)
    # A named function that is not offered is refused, naming the field.
    bad = chat(
        budget_daemon,
        max_tokens=5,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "nope"}},
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "tool_choice"


def test_text_response_format_is_plain_generation(daemon: DaemonChild) -> None:
    # JSON formats are constrained (tests/test_structured_output.py); "text" changes nothing.
    assert chat(daemon, max_tokens=4, response_format={"type": "text"}).status_code == 200


# ---- one rendering: the local API answers as the gateway does -------------------------

CALL_MODEL = "tiny-call-only"


@pytest.fixture(scope="module")
def call_daemon(stack: Stack) -> Iterator[DaemonChild]:
    """A scripted model whose whole answer is one tool call (tests/support/script_model.py)."""
    folder = write_script_model(stack.model_path, stack.home / "models" / CALL_MODEL, script=(CALL_MARKUP,))
    with running_daemon(
        stack.home, nats=stack.nats, provider_id="call-mac", model_id=CALL_MODEL, model_path=folder
    ) as d:
        wait_model(stack.base_url, CALL_MODEL, timeout=120, daemon=d)
        yield d


def test_a_tool_calls_only_answer_has_null_content_locally_and_at_the_gateway(
    stack: Stack, call_daemon: DaemonChild
) -> None:
    body = {"model": CALL_MODEL, "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER_TOOL]}
    local = httpx.post(f"{call_daemon.api_url}/v1/chat/completions", json=body, timeout=60)
    pooled = httpx.post(f"{stack.v1}/chat/completions", json=body, headers=stack.auth(), timeout=60)
    for r in (local, pooled):
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        # As OpenAI: no content, not an empty one.
        assert choice["message"]["content"] is None, r.text
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == [CALL_NAME]
        assert choice["finish_reason"] == "tool_calls"
    streamed = chat(call_daemon, stream=True, messages=body["messages"], tools=[WEATHER_TOOL])
    deltas = [json.loads(p)["choices"][0]["delta"] for p in sse_payloads(streamed.text)[:-1]]
    assert [d["tool_calls"][0]["function"]["name"] for d in deltas if "tool_calls" in d] == [CALL_NAME]
    assert stream_text(sse_payloads(streamed.text)) == ""


def test_the_local_decoder_is_the_gateways(daemon: DaemonChild) -> None:
    # JSON does not tell 3 from 3.0: an integral float is an integer, also where the field is optional.
    r = chat(daemon, max_tokens=3.0, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    # A nested field is named in `param`, as at the gateway.
    bad = chat(daemon, messages=[{"role": "user", "content": 5}])
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "messages[0].content"
    empty = httpx.post(
        f"{daemon.api_url}/v1/chat/completions", content=b" ", headers={"content-type": "application/json"}
    )
    assert empty.status_code == 400
    assert empty.json()["error"]["code"] == "invalid_json"
