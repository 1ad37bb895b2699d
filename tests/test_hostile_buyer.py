"""A hostile buyer (issue 11, part 1): what it sends is refused at once, naming the field, and
nobody else notices.

- The template DoS: an anonymous demo token sending its own `chat_template` in
  `chat_template_kwargs` is refused by the gateway, the daemon's local API and (the bus is
  input too) the daemon itself, while an honest request completes in normal time.
- Bounds: huge and deep schemas, long stop lists, deep JSON, oversized messages, NUL in
  model ids and feedback comments: each a 400 naming the field on every surface, never a
  500, and the model stays served.
- The time limit: a model whose own chat template is slow for one input, and a schema
  llguidance takes a minute to compile, fail alone within MP_PREPARE_TIMEOUT_S as a
  non-retryable 400, while the same daemon keeps heartbeating and serving others.
- Continuation token ids another provider "generated" are range-checked by the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import msgspec
import nats
import pytest

from infra.components import DaemonChild
from infra.nats_auth import control_url
from schemas import bus, limits, subjects
from tests.support.daemons import bus_call, bus_request, daemon_in_pool
from tests.support.stack import TINY_MODEL, TINY_PROVIDER, Stack
from tests.support.tiny_model import CHAT_TEMPLATE

SLOW_MODEL = "tiny-slow-template"
SLOW_PROVIDER = "slow-template-mac"
SLOW_INPUT = "render me slowly"
# The model's own template: ordinary, except that one message makes it loop for hours.
SLOW_TEMPLATE = (
    "{% if messages[-1]['content'] == '" + SLOW_INPUT + "' %}"
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}" + CHAT_TEMPLATE
)
PREPARE_TIMEOUT_S = 1.0
# The attack: the buyer's own template, a minutes-long loop on the daemon's event loop.
DOS_TEMPLATE = {"chat_template": "{% for i in range(30000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}hi"}
# 600 patternProperties: 22 KB of schema that llguidance compiles for about a minute.
SLOW_SCHEMA = {"type": "object", "patternProperties": {f"^p{i}[a-z]+$": {"type": "integer"} for i in range(600)}}

HELLO = [{"role": "user", "content": "Hello, how are you?"}]


def _chat(model: str = TINY_MODEL, **body: Any) -> dict[str, Any]:
    return {"model": model, "messages": HELLO, "max_tokens": 8, "temperature": 0, **body}


def _post(url: str, body: Any, headers: dict[str, str], timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return httpx.post(url, content=content, headers={**headers, "content-type": "application/json"}, timeout=timeout)


def _refused(r: httpx.Response, param: str | None, code: str = "invalid_value") -> None:
    assert r.status_code == 400, r.text[:500]
    error = r.json()["error"]
    assert error["code"] == code, error
    assert error["param"] == param, error


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture(scope="module")
def demo(stack: Stack) -> dict[str, str]:
    issued = httpx.post(f"{stack.base_url}/auth/demo", timeout=30)
    assert issued.status_code == 201, issued.text
    return {"Authorization": f"Bearer {issued.json()['token']}"}


def _served(stack: Stack, model: str) -> bool:
    r = httpx.get(f"{stack.v1}/models", headers=stack.auth(), timeout=10)
    return r.status_code == 200 and any(m["id"] == model for m in r.json()["data"])


def _timed(send: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = send()
    return r, time.monotonic() - started


# ---- the template DoS ---------------------------------------------------------------------


def test_a_demo_token_cannot_swap_the_chat_template(stack: Stack, demo: dict[str, str]) -> None:
    url = f"{stack.v1}/chat/completions"
    honest = _chat(max_tokens=16)
    baseline = _timed(lambda: _post(url, honest, stack.auth()))[1]
    with ThreadPoolExecutor(2) as pool:
        honest_run = pool.submit(_timed, lambda: _post(url, honest, stack.auth()))
        attack, attack_s = _timed(lambda: _post(url, _chat(chat_template_kwargs=DOS_TEMPLATE), demo))
        answer, answer_s = honest_run.result()
    _refused(attack, "chat_template_kwargs.chat_template")
    assert attack_s < 1.0, attack_s
    assert answer.status_code == 200, answer.text
    assert answer_s < 2 * baseline + 1.0, (answer_s, baseline)

    # apply_chat_template's own options and the template's own variables are refused too.
    for key, value in (("tokenize", False), ("add_generation_prompt", False), ("tools", []), ("bos_token", "x")):
        _refused(_post(url, _chat(chat_template_kwargs={key: value}), demo), f"chat_template_kwargs.{key}")
    _refused(
        _post(url, _chat(chat_template_kwargs={"enable_thinking": "no"}), demo), "chat_template_kwargs.enable_thinking"
    )
    # What templates read to select their behaviour still works.
    ok = _post(url, _chat(chat_template_kwargs={"enable_thinking": False, "reasoning_effort": "low"}), demo)
    assert ok.status_code == 200, ok.text


def test_the_daemon_refuses_a_template_swap_on_its_local_api_and_on_the_bus(stack: Stack) -> None:
    local = _post(f"{stack.daemon.api_url}/v1/chat/completions", _chat(chat_template_kwargs=DOS_TEMPLATE), {})
    _refused(local, "chat_template_kwargs.chat_template")
    # A request on the bus that no gateway checked (the bus is input too).
    request = msgspec.structs.replace(
        bus_request("hostile-template", TINY_MODEL), chat_template_kwargs=dict(DOS_TEMPLATE)
    )
    started = time.monotonic()
    frames = asyncio.run(bus_call(stack.nats, TINY_PROVIDER, request, timeout=10))
    assert time.monotonic() - started < 2.0
    failed = frames[-1]
    assert isinstance(failed, bus.Failed), frames
    assert (failed.code, failed.param, failed.retryable) == (
        "invalid_value",
        "chat_template_kwargs.chat_template",
        False,
    )


# ---- bounds, on every surface -------------------------------------------------------------

_BIG_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(12_000)}}
_DEEP_SCHEMA: dict[str, Any] = {"type": "string"}
for _ in range(40):
    _DEEP_SCHEMA = {"type": "object", "properties": {"x": _DEEP_SCHEMA}}
_TOOL: dict[str, Any] = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def _deep_tool(depth: int) -> str:
    return f'[{{"type": "function", "function": {{"name": "f", "parameters": {{"a": {_nested(depth)}}}}}}}]'


def _raw_chat(**raw: str) -> bytes:
    """A chat body with some fields given as raw JSON text (deep nesting json.dumps would refuse)."""
    fields = ", ".join(f'"{k}": {v}' for k, v in raw.items())
    return f'{{"model": "{TINY_MODEL}", "messages": {json.dumps(HELLO)}, "max_tokens": 4, {fields}}}'.encode()


CHAT_CASES: list[tuple[str, Any, str]] = [
    ("huge schema", _chat(response_format=_schema_format(_BIG_SCHEMA)), "response_format.json_schema.schema"),
    ("deep schema", _chat(response_format=_schema_format(_DEEP_SCHEMA)), "response_format.json_schema.schema"),
    (
        "10,000 nested arrays in a tool schema",
        _raw_chat(
            tools=f'[{{"type": "function", "function": {{"name": "f", "parameters": {{"a": {_nested(10_000)}}}}}}}]'
        ),
        "tools[0].function.parameters",
    ),
    (
        "100 nested arrays in a tool schema",
        _raw_chat(
            tools=f'[{{"type": "function", "function": {{"name": "f", "parameters": {{"a": {_nested(100)}}}}}}}]'
        ),
        "tools[0].function.parameters",
    ),
    ("10,000 nested arrays in metadata", _raw_chat(metadata=f'{{"a": {_nested(10_000)}}}'), "metadata"),
    ("10,000 nested arrays in a field we ignore", _raw_chat(extra=_nested(10_000)), "extra"),
    ("five stop strings", _chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("a long stop string", _chat(stop=["x" * (limits.MAX_STOP_CHARS + 1)]), "stop[0]"),
    ("too many messages", _chat(messages=HELLO * (limits.MAX_MESSAGES + 1)), "messages"),
    (
        "an oversized message",
        _chat(messages=[{"role": "user", "content": "x" * (limits.MAX_TEXT_CHARS + 1)}]),
        "messages[0].content",
    ),
    (
        "an oversized conversation",
        _chat(messages=[{"role": "user", "content": "é" * (limits.MAX_CONVERSATION_BYTES // 3)}] * 2),
        "messages",
    ),
    ("too many tools", _chat(tools=[_TOOL] * (limits.MAX_TOOLS + 1)), "tools"),
    (
        "an oversized tool",
        _chat(tools=[{**_TOOL, "function": {**_TOOL["function"], "description": "d" * limits.MAX_TOOL_BYTES}}]),
        "tools[0]",
    ),
    ("a huge logit_bias", _chat(logit_bias={str(i): 1 for i in range(limits.MAX_LOGIT_BIAS + 1)}), "logit_bias"),
    ("a seed past 64 bits", _chat(seed=1 << 70), "seed"),
    ("a top_k past 32 bits", _chat(top_k=1 << 40), "top_k"),
    ("NUL in the model id", _chat(model="tiny\x00llama"), "model"),
]


@pytest.mark.parametrize(("case", "body", "param"), CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_chat_bounds_are_400s_naming_the_field(
    stack: Stack, demo: dict[str, str], case: str, body: Any, param: str
) -> None:
    r, seconds = _timed(lambda: _post(f"{stack.v1}/chat/completions", body, demo))
    _refused(r, param)
    assert seconds < 2.0, (case, seconds)


def test_bounds_hold_on_the_other_surfaces(stack: Stack) -> None:
    v1, auth = stack.v1, stack.auth()
    completion = {"model": TINY_MODEL, "prompt": "Hi", "max_tokens": 4}
    _refused(_post(f"{v1}/completions", {**completion, "model": "a\x00b"}, auth), "model")
    _refused(_post(f"{v1}/completions", {**completion, "prompt": "x" * (limits.MAX_TEXT_CHARS + 1)}, auth), "prompt")
    _refused(_post(f"{v1}/completions", {**completion, "stop": ["a", "b", "c", "d", "e"]}, auth), "stop")

    responses = {"model": TINY_MODEL, "input": "Hi", "max_output_tokens": 16}
    _refused(_post(f"{v1}/responses", {**responses, "model": "a\x00b"}, auth), "model")
    deep_tool = f'{{"model": "{TINY_MODEL}", "input": "Hi", "tools": [{{"type": "function", "x": {_nested(10_000)}}}]}}'
    _refused(_post(f"{v1}/responses", deep_tool.encode(), auth), "tools[0]")
    fmt = {"format": {"type": "json_schema", "name": "out", "schema": _DEEP_SCHEMA}}
    _refused(_post(f"{v1}/responses", {**responses, "text": fmt}, auth), "text.format.schema")
    _refused(
        _post(f"{v1}/responses", {**responses, "input": [{"role": "user", "content": "x"}] * 10_001}, auth), "input"
    )

    # Anthropic's error shape has no `param`: the 400 and its message name the field.
    message = {"model": TINY_MODEL, "max_tokens": 4, "messages": HELLO}
    for body, field in (
        ({**message, "model": "a\x00b"}, "model"),
        ({**message, "stop_sequences": ["s"] * 17}, "stop_sequences"),
        (
            f'{{"model": "{TINY_MODEL}", "max_tokens": 4, "messages": [{{"role": "assistant", "content": '
            f'[{{"type": "tool_use", "id": "t", "name": "f", "input": {{"a": {_nested(10_000)}}}}}]}}]}}'.encode(),
            "messages[0].content[0].input",
        ),
        (
            {**message, "tools": [{"name": "f", "input_schema": {"a": json.loads(_nested(80))}}]},
            "tools[0].input_schema",
        ),
    ):
        r = _post(f"{stack.base_url}/v1/messages", body, auth)
        assert r.status_code == 400, r.text[:300]
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert field in r.json()["error"]["message"], r.text[:300]

    # Feedback comments are shown to operators and stored in Postgres: no NUL, no control characters.
    for comment in ("great\x00", "bell\x07"):
        r = _post(f"{v1}/feedback", {"request_id": "abc", "rating": 5, "comment": comment}, auth)
        _refused(r, "comment")
    ok = _post(f"{v1}/feedback", {"request_id": "abc", "rating": 5, "comment": "tabs\tand\nlines"}, auth)
    assert ok.status_code == 404, ok.text  # well-formed: only the id is unknown

    assert _served(stack, TINY_MODEL)


def test_the_local_api_holds_the_same_bounds(stack: Stack) -> None:
    api = stack.daemon.api_url
    deep = _raw_chat(tools=f'[{{"type": "function", "function": {{"name": "f", "parameters": {_nested(10_000)}}}}}]')
    _refused(_post(f"{api}/v1/chat/completions", deep, {}), "tools[0].function.parameters")
    _refused(_post(f"{api}/v1/chat/completions", _chat(model="a\x00b"), {}), "model")
    _refused(_post(f"{api}/v1/chat/completions", _chat(stop=["a", "b", "c", "d", "e"]), {}), "stop")
    big = _chat(response_format=_schema_format(_BIG_SCHEMA))
    _refused(_post(f"{api}/v1/chat/completions", big, {}), "response_format.json_schema.schema")
    ok = _post(f"{api}/v1/chat/completions", _chat(), {})
    assert ok.status_code == 200, ok.text


# ---- the time limit -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_daemon(stack: Stack) -> Iterator[DaemonChild]:
    folder = stack.home / "models" / SLOW_MODEL
    shutil.copytree(stack.model_path, folder, dirs_exist_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = SLOW_TEMPLATE
    config_path.write_text(json.dumps(config))
    with daemon_in_pool(
        stack,
        provider_id=SLOW_PROVIDER,
        model_id=SLOW_MODEL,
        model_path=folder,
        # The default two helpers: one slow request must not hold up the other.
        env={"MP_PREPARE_TIMEOUT_S": str(PREPARE_TIMEOUT_S), "MP_PREPARE_HELPERS": "2"},
    ) as daemon:
        yield daemon


@contextlib.asynccontextmanager
async def _heartbeats(stack: Stack, provider_id: str) -> AsyncIterator[list[float]]:
    """Arrival times of the provider's heartbeats while the block runs."""
    nc = await nats.connect(control_url(stack.nats))
    seen: list[float] = []

    async def on_beat(msg: Any) -> None:
        seen.append(time.monotonic())

    try:
        await nc.subscribe(subjects.heartbeat(provider_id), cb=on_beat)
        yield seen
    finally:
        await nc.close()


def _helpers_started(daemon: DaemonChild) -> int:
    assert daemon.log_path is not None
    return daemon.log_path.read_text(errors="replace").count("prepare_helper_ready")


async def _helpers_back(daemon: DaemonChild, count: int) -> None:
    """Until `count` helpers have started in all (a killed helper's replacement takes about a second)."""
    deadline = time.monotonic() + 30
    while _helpers_started(daemon) < count:
        assert time.monotonic() < deadline, daemon.log_tail()
        await asyncio.sleep(0.1)


def _largest_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *times, end]
    return max(b - a for a, b in itertools.pairwise(points))


async def test_a_slow_chat_template_fails_alone_and_the_daemon_keeps_serving(
    stack: Stack, slow_daemon: DaemonChild
) -> None:
    url = f"{stack.v1}/chat/completions"
    honest = _chat(SLOW_MODEL, max_tokens=16)
    slow = _chat(SLOW_MODEL, messages=[{"role": "user", "content": SLOW_INPUT}])
    baseline = (await asyncio.to_thread(_timed, lambda: _post(url, honest, stack.auth())))[1]
    helpers = _helpers_started(slow_daemon)
    async with _heartbeats(stack, SLOW_PROVIDER) as beats:
        started = time.monotonic()
        for kills in range(2):  # the second time beside the helper that replaced the killed one
            await _helpers_back(slow_daemon, helpers + kills)
            (refused, refused_s), (answer, answer_s) = await asyncio.gather(
                asyncio.to_thread(_timed, lambda: _post(url, slow, stack.auth())),
                asyncio.to_thread(_timed, lambda: _post(url, honest, stack.auth())),
            )
            _refused(refused, "messages", code="request_too_complex")
            assert PREPARE_TIMEOUT_S <= refused_s < PREPARE_TIMEOUT_S + 1.5, refused_s
            assert answer.status_code == 200, answer.text
            assert answer_s < 2 * baseline + 1.0, (answer_s, baseline)
        ended = time.monotonic()
    # Heartbeats every 0.5 s went on throughout.
    assert _largest_gap(beats, started, ended) < 1.5, beats

    # On the bus: refused once, not handed to the next provider.
    request = bus_request("slow-template", SLOW_MODEL, content=SLOW_INPUT)
    frames = await bus_call(stack.nats, SLOW_PROVIDER, request, timeout=10)
    failed = frames[-1]
    assert isinstance(failed, bus.Failed), frames
    assert (failed.code, failed.param, failed.retryable) == ("request_too_complex", "messages", False)


async def test_a_slow_schema_is_refused_up_front_and_fails_alone_past_the_bounds(
    stack: Stack, slow_daemon: DaemonChild
) -> None:
    url = f"{slow_daemon.api_url}/v1/chat/completions"
    # The previous test's killed helpers have been replaced (2 at start, 3 kills).
    await _helpers_back(slow_daemon, 5)
    slow = _chat(SLOW_MODEL, response_format=_schema_format(SLOW_SCHEMA))
    honest = _chat(SLOW_MODEL, response_format=_schema_format({"type": "object"}), max_tokens=4)
    # Wider than constrained decoding can carry: a 400 at once, on the local API as at the gateway.
    for target, headers in ((url, {}), (f"{stack.v1}/chat/completions", stack.auth())):
        refused, refused_s = await asyncio.to_thread(_timed, lambda t=target, h=headers: _post(t, slow, h))
        _refused(refused, "response_format.json_schema.schema", code="invalid_value")
        assert "patternProperties" in refused.json()["error"]["message"]
        assert refused_s < 0.5, refused_s
    # Past the surface's bounds (straight on the bus), the prepare time limit still holds: the slow
    # compile fails alone, in its helper, and an honest request beside it is answered.
    fmt = bus.ResponseFormat(type="json_schema", schema=SLOW_SCHEMA)
    request = msgspec.structs.replace(
        bus_request("slow-schema", SLOW_MODEL),
        params=bus.SamplingParams(max_tokens=4, response_format=fmt),
    )
    started = time.monotonic()
    frames, (answer, _) = await asyncio.gather(
        bus_call(stack.nats, SLOW_PROVIDER, request, timeout=10),
        asyncio.to_thread(_timed, lambda: _post(url, honest, {})),
    )
    failed = frames[-1]
    assert isinstance(failed, bus.Failed), frames
    assert (failed.code, failed.param, failed.retryable) == (
        "request_too_complex",
        "response_format.json_schema.schema",
        False,
    )
    assert time.monotonic() - started < PREPARE_TIMEOUT_S + 1.5
    assert answer.status_code == 200, answer.text
    health = await asyncio.to_thread(httpx.get, f"{slow_daemon.api_url}/health", timeout=5)
    assert health.json()["model"] == SLOW_MODEL


# ---- continuations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "token_ids", "code"),
    [
        # The tiny model's vocabulary has 400 ids.
        ("an id past the vocabulary", [5, 405], "invalid_continuation"),
        ("more ids than the context holds", [5] * (1 << 16), "invalid_continuation"),
        # Past the wire's own bounds (schemas/bus.py), the request does not even decode.
        ("an id past any vocabulary", [5, 10**9], "bad_request"),
        ("a negative id", [-1, 5], "bad_request"),
    ],
)
def test_continuation_token_ids_are_range_checked(stack: Stack, case: str, token_ids: list[int], code: str) -> None:
    request = msgspec.structs.replace(
        bus_request(f"continue-{len(token_ids)}-{token_ids[-1]}", TINY_MODEL),
        continuation=bus.Continuation(token_ids=token_ids, text=""),
    )
    frames = asyncio.run(bus_call(stack.nats, TINY_PROVIDER, request, timeout=10))
    failed = frames[-1]
    assert isinstance(failed, bus.Failed), (case, frames)
    assert (failed.code, failed.param, failed.retryable) == (code, None, False), case


def test_a_valid_continuation_still_runs(stack: Stack) -> None:
    request = msgspec.structs.replace(
        bus_request("continue-ok", TINY_MODEL), continuation=bus.Continuation(token_ids=[40, 41], text="")
    )
    frames = asyncio.run(bus_call(stack.nats, TINY_PROVIDER, request, timeout=30))
    assert isinstance(frames[0], bus.Accepted), frames
    assert isinstance(frames[-1], bus.Done), frames


def test_nothing_above_hurt_the_pool(stack: Stack) -> None:
    assert _served(stack, TINY_MODEL)
    r = _post(f"{stack.v1}/chat/completions", _chat(), stack.auth())
    assert r.status_code == 200, r.text
