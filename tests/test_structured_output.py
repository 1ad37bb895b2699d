"""response_format json_object / json_schema: decoding constrained by llguidance in the worker.

The tiny model has random weights and otherwise writes garbage, so valid JSON
from it shows the constraint at work, not the model's manners.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from schemas import bus
from tests.support.daemons import bus_call, bus_request, daemon_in_pool, sse_payloads, stream_text
from tests.support.schema_check import errors
from tests.support.stack import TINY_MODEL, TINY_PROVIDER, Stack

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "admin": {"type": "boolean"},
        "pets": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "kind": {"enum": ["cat", "dog"]},
                    "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                },
                "required": ["kind", "legs"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "mood", "admin", "pets"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def _schema_format(schema: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, **extra}}


async def _chat(client: httpx.AsyncClient, stack: Stack, **body: Any) -> dict[str, Any]:
    payload = {"model": TINY_MODEL, "messages": ASK, "max_tokens": 300, **body}
    r = await client.post(f"{stack.v1}/chat/completions", json=payload, headers=stack.auth())
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _content(answer: dict[str, Any]) -> tuple[str, str]:
    choice = answer["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


async def test_json_object_is_always_a_json_object(stack: Stack) -> None:
    # Free strings from random weights can run long: these seeds close theirs within a few hundred tokens.
    async with httpx.AsyncClient(timeout=120) as client:
        answers = await asyncio.gather(
            _chat(client, stack, response_format={"type": "json_object"}, temperature=0, max_tokens=1500),
            *(
                _chat(client, stack, response_format={"type": "json_object"}, temperature=1.0, seed=s, max_tokens=1500)
                for s in (0, 2, 4, 5)
            ),
        )
    for answer in answers:
        text, finish = _content(answer)
        assert finish == "stop", text
        assert isinstance(json.loads(text), dict), text


async def test_json_schema_output_validates_against_the_schema(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        answers = await asyncio.gather(
            *(
                _chat(client, stack, response_format=_schema_format(PERSON, strict=True), temperature=1.0, seed=s)
                for s in range(4)
            )
        )
    for answer in answers:
        text, finish = _content(answer)
        assert finish == "stop", text
        value = json.loads(text)
        assert errors(value, PERSON) == [], text


async def test_streamed_chunks_concatenate_to_valid_json(stack: Stack) -> None:
    payload = {
        "model": TINY_MODEL,
        "messages": ASK,
        "max_tokens": 300,
        "temperature": 0,
        "stream": True,
        "response_format": _schema_format(PERSON),
    }
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(f"{stack.v1}/chat/completions", json=payload, headers=stack.auth())
        plain = await _chat(client, stack, **{**payload, "stream": False})
    assert r.status_code == 200, r.text
    chunks = sse_payloads(r.text)
    assert chunks[-1] == "[DONE]"
    finishes = [c["finish_reason"] for p in chunks[:-1] for c in json.loads(p)["choices"] if c["finish_reason"]]
    text = stream_text(chunks)
    assert finishes == ["stop"]
    assert errors(json.loads(text), PERSON) == [], text
    # It streamed, not one lump. Not more than that: the tokens a busy daemon has ready together go in
    # one frame by design (daemon/frames.py), and on a loaded CI machine this tiny model's 30-odd
    # tokens once came as 3 chunks (24-75 here under two CPU hogs).
    assert len([p for p in chunks if '"content"' in p]) > 1
    assert text == _content(plain)[0]


def test_logprobs_of_a_constrained_answer_list_only_allowed_alternatives(stack: Stack) -> None:
    body = {"model": TINY_MODEL, "messages": ASK, "max_tokens": 4, "temperature": 0, "logprobs": True}
    body |= {"top_logprobs": 5, "response_format": _schema_format(PERSON)}
    r = httpx.post(f"{stack.v1}/chat/completions", json=body, headers=stack.auth(), timeout=60)
    assert r.status_code == 200, r.text
    tokens = r.json()["choices"][0]["logprobs"]["content"]
    assert '{"name": "'.startswith("".join(t["token"] for t in tokens))
    for t in tokens:
        assert isinstance(t["logprob"], float)
        # Where the grammar leaves one token (the opening brace), it is the only alternative.
        assert 1 <= len(t["top_logprobs"]) <= 5
        assert all(isinstance(alt["logprob"], float) for alt in t["top_logprobs"])
    assert [alt["token"] for alt in tokens[0]["top_logprobs"]] == [tokens[0]["token"]]


async def test_max_tokens_cuts_a_valid_prefix_with_finish_length(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        cut, whole = await asyncio.gather(
            _chat(client, stack, response_format=_schema_format(PERSON), temperature=0, max_tokens=6),
            _chat(client, stack, response_format=_schema_format(PERSON), temperature=0, max_tokens=300),
        )
    cut_text, cut_finish = _content(cut)
    whole_text, whole_finish = _content(whole)
    assert (cut_finish, whole_finish) == ("length", "stop")
    assert cut["usage"]["completion_tokens"] == 6
    # Greedy: the cut answer is where the whole one was going, a prefix of valid JSON.
    assert cut_text.startswith('{"name": "'), cut_text
    assert whole_text.startswith(cut_text)
    assert errors(json.loads(whole_text), PERSON) == []


async def test_constrained_and_free_requests_share_a_batch_and_both_stay_right(stack: Stack) -> None:
    free = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "temperature": 0, "max_tokens": 120}
    async with httpx.AsyncClient(timeout=120) as client:
        alone = await _chat(client, stack, **free)
        together = await asyncio.gather(
            _chat(client, stack, **free),
            *(_chat(client, stack, response_format=_schema_format(PERSON), temperature=1.0, seed=s) for s in range(3)),
            _chat(client, stack, **free),
        )
    # The free neighbours are untouched by the masks next to them (same greedy text as alone)...
    assert _content(together[0]) == _content(alone) == _content(together[-1])
    assert _content(alone)[1] == "length"
    # ...and each constrained row keeps to its own schema.
    for answer in together[1:-1]:
        text, finish = _content(answer)
        assert finish == "stop"
        assert errors(json.loads(text), PERSON) == [], text


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        (
            {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 2}}, "required": ["n"]},
            "unsatisfiable",
        ),
        ({"type": "whatever"}, "whatever"),
        ({"type": "object", "properties": {"s": {"type": "string", "pattern": "(unclosed"}}}, "regex"),
        ({"$ref": "#/$defs/missing"}, "missing"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_it(stack: Stack, schema: Any, says: str) -> None:
    payload = {"model": TINY_MODEL, "messages": ASK, "max_tokens": 5, "response_format": _schema_format(schema)}
    r = httpx.post(f"{stack.v1}/chat/completions", json=payload, headers=stack.auth(), timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_value",
        "response_format.json_schema.schema",
    )
    assert says in error["message"]


def test_json_schema_without_a_schema_is_a_400(stack: Stack) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "nothing"}}
    payload = {"model": TINY_MODEL, "messages": ASK, "max_tokens": 5, "response_format": fmt}
    r = httpx.post(f"{stack.v1}/chat/completions", json=payload, headers=stack.auth(), timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format.json_schema.schema"


def test_tools_with_a_json_format_are_refused_unless_tool_choice_none(stack: Stack) -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    payload = {
        "model": TINY_MODEL,
        "messages": ASK,
        "max_tokens": 300,
        "temperature": 0,
        "tools": [tool],
        "response_format": _schema_format(PERSON),
    }
    r = httpx.post(f"{stack.v1}/chat/completions", json=payload, headers=stack.auth(), timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_value", "response_format")
    assert "tool_choice" in error["message"]
    r = httpx.post(
        f"{stack.v1}/chat/completions", json={**payload, "tool_choice": "none"}, headers=stack.auth(), timeout=60
    )
    assert r.status_code == 200, r.text
    assert errors(json.loads(r.json()["choices"][0]["message"]["content"]), PERSON) == []


def test_responses_text_format_is_constrained_and_echoed(stack: Stack) -> None:
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    body = {"model": TINY_MODEL, "input": "Describe a person.", "temperature": 0, "text": {"format": fmt}}
    r = httpx.post(f"{stack.v1}/responses", json=body, headers=stack.auth(), timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == "completed"
    assert answer["text"]["format"] == fmt
    text = answer["output"][0]["content"][0]["text"]
    assert errors(json.loads(text), PERSON) == [], text

    body["text"] = {"format": {"type": "json_object"}}
    r = httpx.post(f"{stack.v1}/responses", json={**body, "store": False}, headers=stack.auth(), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["text"]["format"] == {"type": "json_object"}

    body["text"] = {"format": {**fmt, "schema": {"type": "whatever"}}}
    r = httpx.post(f"{stack.v1}/responses", json=body, headers=stack.auth(), timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "text.format.schema"


def test_the_daemons_local_api_constrains_too(stack: Stack) -> None:
    status = httpx.get(
        f"{stack.daemon.admin_url}/admin/status", headers=stack.daemon.admin_headers(), timeout=10
    ).json()
    assert status["model"]["structured_output"] is True
    url = f"{stack.daemon.api_url}/v1/chat/completions"
    body = {"model": "any", "messages": ASK, "max_tokens": 300, "temperature": 0}
    r = httpx.post(url, json={**body, "response_format": _schema_format(PERSON)}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert errors(json.loads(choice["message"]["content"]), PERSON) == []

    r = httpx.post(url, json={**body, "stream": True, "response_format": {"type": "json_object"}}, timeout=60)
    assert r.status_code == 200, r.text
    assert isinstance(json.loads(stream_text(sse_payloads(r.text))), dict)

    r = httpx.post(url, json={**body, "response_format": _schema_format({"type": "whatever"})}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "response_format.json_schema.schema")


async def test_a_failover_continuation_resumes_inside_the_grammar(stack: Stack) -> None:
    fmt = bus.ResponseFormat(type="json_schema", schema=PERSON)
    whole = await bus_call(
        stack.nats_url, TINY_PROVIDER, bus_request("so-whole", TINY_MODEL, max_tokens=300, response_format=fmt)
    )
    deltas = [f for f in whole if isinstance(f, bus.Delta)]
    assert isinstance(whole[-1], bus.Done)
    assert whole[-1].finish_reason == "stop"
    text = "".join(d.text for d in deltas)
    assert errors(json.loads(text), PERSON) == [], text
    # The first provider "died" after a few deltas: another one continues from their tokens.
    head = deltas[:5]
    sofar = bus.Continuation(token_ids=[t for d in head for t in d.token_ids], text="".join(d.text for d in head))
    request = bus_request("so-rest", TINY_MODEL, max_tokens=300, response_format=fmt)
    rest = await bus_call(stack.nats, TINY_PROVIDER, msgspec.structs.replace(request, continuation=sofar))
    assert isinstance(rest[-1], bus.Done)
    assert rest[-1].finish_reason == "stop"
    # Greedy: the continued answer is the one the first provider was writing, still valid JSON.
    assert sofar.text + "".join(f.text for f in rest if isinstance(f, bus.Delta)) == text

    # Tokens that the grammar could never have produced are refused, not built upon.
    wrong = bus.Continuation(token_ids=deltas[1].token_ids, text=deltas[1].text)
    request = bus_request("so-wrong", TINY_MODEL, max_tokens=300, response_format=fmt)
    failed = await bus_call(stack.nats, TINY_PROVIDER, msgspec.structs.replace(request, continuation=wrong))
    assert isinstance(failed[-1], bus.Failed), failed
    assert "response_format" in failed[-1].message


def test_a_provider_that_cannot_constrain_refuses_instead_of_writing_free_text(stack: Stack, tmp_path: Path) -> None:
    # A daemon whose Python cannot import llguidance, as on a machine without its wheel.
    shim = tmp_path / "shim" / "llguidance"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("llguidance hidden by the test")\n')
    model = "tiny-llama-free-text"
    with daemon_in_pool(
        stack, provider_id="no-llguidance-mac", model_id=model, env={"PYTHONPATH": str(shim.parent)}
    ) as daemon:
        body = {"model": model, "messages": ASK, "max_tokens": 20, "response_format": {"type": "json_object"}}
        r = httpx.post(f"{stack.v1}/chat/completions", json=body, headers=stack.auth(), timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("unsupported_value", "response_format")
        assert "constrain" in error["message"]
        # Its own local API says the same; free text is still served.
        r = httpx.post(f"{daemon.api_url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "response_format"
        body.pop("response_format")
        r = httpx.post(f"{stack.v1}/chat/completions", json=body, headers=stack.auth(), timeout=60)
        assert r.status_code == 200, r.text
        answer = httpx.get(f"{daemon.admin_url}/admin/status", headers=daemon.admin_headers(), timeout=10).json()
        assert answer["model"]["structured_output"] is False
    assert "structured_output_unavailable" in daemon.log_tail()
