"""A model that thinks, through the real daemon and gateway: reasoning apart from the answer on
every surface (chat, the official SDKs, Anthropic thinking blocks, Responses reasoning items,
the daemon's local API), a template that opens the block itself, failover inside the thinking,
and the stop string that ended an answer named on Anthropic's surface.

The model is scripted (tests/support/think_model.py): it always says
`<think>The user greets me</think>Hello there!`, one token per piece.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import msgspec
import openai
import pytest

from infra.components import DaemonChild
from schemas import bus
from tests.support.daemons import bus_call, bus_request, daemon_in_pool
from tests.support.stack import Stack
from tests.support.think_model import ANSWER, REASONING, write_think_model

MODEL = "tiny-think"
PROVIDER = "think-mac"
HELLO: Any = [{"role": "user", "content": "Hello, how are you?"}]
# <think>, four reasoning pieces, </think>: the tags count as thinking.
REASONING_TOKENS = 6
COMPLETION_TOKENS = 9
OPEN: Any = {"chat_template_kwargs": {"thinking": True}}


@pytest.fixture(scope="module")
def think_daemon(stack: Stack) -> Iterator[DaemonChild]:
    folder = write_think_model(stack.model_path, stack.home / "models" / MODEL)
    with daemon_in_pool(stack, provider_id=PROVIDER, model_id=MODEL, model_path=folder) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.v1, api_key=stack.api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def claude(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=60)


def _post(stack: Stack, path: str, **body: Any) -> httpx.Response:
    r = httpx.post(f"{stack.v1}/{path}", json={"model": MODEL, **body}, headers=stack.auth(), timeout=60)
    assert r.status_code == 200, r.text
    return r


def _sse(text: str) -> list[tuple[str | None, Any]]:
    """(event name, data) of each server-sent event."""
    out: list[tuple[str | None, Any]] = []
    for block in text.split("\n\n"):
        name, data = None, None
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data = value if value == "[DONE]" else json.loads(value)
        if data is not None:
            out.append((name, data))
    return out


# ---- chat completions ---------------------------------------------------------------


def test_chat_separates_reasoning_from_content(stack: Stack, think_daemon: DaemonChild) -> None:
    body = _post(stack, "chat/completions", messages=HELLO, max_tokens=32).json()
    choice = body["choices"][0]
    assert choice["message"]["reasoning_content"] == REASONING
    assert choice["message"]["content"] == ANSWER
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == COMPLETION_TOKENS
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": REASONING_TOKENS}


def test_chat_stream_sends_reasoning_first_then_content(stack: Stack, think_daemon: DaemonChild) -> None:
    r = _post(
        stack, "chat/completions", messages=HELLO, max_tokens=32, stream=True, stream_options={"include_usage": True}
    )
    assert "think>" not in r.text
    chunks = [data for _, data in _sse(r.text) if data != "[DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    kinds = [k for d in deltas for k in ("reasoning_content", "content") if d.get(k)]
    # Streamed live, in order: all the reasoning, then the answer. Tokens that were ready together may share a
    # chunk (daemon/frames.py, services/gateway/frames.py), so how many chunks each takes is not fixed.
    assert kinds == sorted(kinds, reverse=True), kinds
    assert set(kinds) == {"reasoning_content", "content"}
    assert len(kinds) <= 4 + 3
    assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == REASONING_TOKENS


def test_openai_sdk_reads_reasoning_content(oai: openai.OpenAI, think_daemon: DaemonChild) -> None:
    completion = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=32)
    message = completion.choices[0].message
    assert message.content == ANSWER
    assert getattr(message, "reasoning_content", None) == REASONING
    assert completion.usage is not None
    assert completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == REASONING_TOKENS
    stream = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=32, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == REASONING
    assert "".join(d.content or "" for d in deltas) == ANSWER


def test_template_that_opens_the_block_in_the_prompt(stack: Stack, think_daemon: DaemonChild) -> None:
    body = _post(stack, "chat/completions", messages=HELLO, max_tokens=32, **OPEN).json()
    assert body["choices"][0]["message"]["reasoning_content"] == REASONING
    assert body["choices"][0]["message"]["content"] == ANSWER
    # The model did not write <think>: the prompt did.
    assert body["usage"]["completion_tokens"] == COMPLETION_TOKENS - 1
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == REASONING_TOKENS - 1


def test_thinking_off_answers_without_reasoning(stack: Stack, think_daemon: DaemonChild) -> None:
    body = _post(stack, "chat/completions", messages=HELLO, max_tokens=32, reasoning_effort="none").json()
    message = body["choices"][0]["message"]
    assert message["content"] == ANSWER
    assert "reasoning_content" not in message
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


# A schema the scripted model must close quickly (left free, it may write one long string).
SHORT_JSON: Any = {
    "type": "json_schema",
    "json_schema": {
        "name": "short",
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "string", "maxLength": 5}},
            "required": ["answer"],
            "additionalProperties": False,
        },
    },
}


def test_json_output_from_a_thinking_model_is_all_answer(stack: Stack, think_daemon: DaemonChild) -> None:
    # The grammar allows JSON from the first token: no thinking block, even where the template
    # would open one, and the whole constrained text is the answer.
    extras: list[dict[str, Any]] = [{}, OPEN]
    for extra in extras:
        body = _post(
            stack, "chat/completions", messages=HELLO, max_tokens=64, response_format=SHORT_JSON, **extra
        ).json()
        message = body["choices"][0]["message"]
        assert set(json.loads(message["content"])) == {"answer"}, message
        assert body["choices"][0]["finish_reason"] == "stop"
        assert "reasoning_content" not in message
        assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_stop_strings_end_the_answer_not_the_thinking(stack: Stack, think_daemon: DaemonChild) -> None:
    # "greets" is in the reasoning only: the answer is whole.
    body = _post(stack, "chat/completions", messages=HELLO, max_tokens=32, stop=["greets"]).json()
    assert body["choices"][0]["message"]["reasoning_content"] == REASONING
    assert body["choices"][0]["message"]["content"] == ANSWER
    stopped = _post(stack, "chat/completions", messages=HELLO, max_tokens=32, stop=[" there"]).json()
    assert stopped["choices"][0]["message"]["content"] == "Hello"
    assert stopped["choices"][0]["finish_reason"] == "stop", "OpenAI's surfaces do not name the stop string"


# ---- Anthropic Messages -------------------------------------------------------------


def test_anthropic_thinking_block_then_text(claude: anthropic.Anthropic, think_daemon: DaemonChild) -> None:
    message = claude.messages.create(model=MODEL, max_tokens=32, messages=HELLO)
    thinking, text = message.content
    assert thinking.type == "thinking"
    assert thinking.thinking == REASONING
    assert thinking.signature == ""
    assert text.type == "text"
    assert text.text == ANSWER
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None

    with claude.messages.stream(model=MODEL, max_tokens=32, messages=HELLO) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in events]
    blocks = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert blocks == ["thinking", "text"]
    first_text = kinds.index(("content_block_delta", "text_delta"))
    assert ("content_block_delta", "thinking_delta") in kinds[:first_text]
    assert ("content_block_delta", "signature_delta") in kinds[:first_text]
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == REASONING  # type: ignore[union-attr]
    assert final.content[1].text == ANSWER  # type: ignore[union-attr]


def test_anthropic_thinking_disabled(claude: anthropic.Anthropic, think_daemon: DaemonChild) -> None:
    message = claude.messages.create(model=MODEL, max_tokens=32, messages=HELLO, thinking={"type": "disabled"})
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == ANSWER  # type: ignore[union-attr]


def test_anthropic_names_the_stop_sequence(claude: anthropic.Anthropic, think_daemon: DaemonChild) -> None:
    stops = ["never", " there"]
    message = claude.messages.create(model=MODEL, max_tokens=32, messages=HELLO, stop_sequences=stops)
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == " there"
    assert message.content[-1].text == "Hello"  # type: ignore[union-attr]
    with claude.messages.stream(model=MODEL, max_tokens=32, messages=HELLO, stop_sequences=stops) as stream:
        delta = next(e for e in stream if e.type == "message_delta")
        final = stream.get_final_message()
    assert (delta.delta.stop_reason, delta.delta.stop_sequence) == ("stop_sequence", " there")
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", " there")
    # A stop string only the thinking contains ends nothing.
    whole = claude.messages.create(model=MODEL, max_tokens=32, messages=HELLO, stop_sequences=["greets"])
    assert (whole.stop_reason, whole.stop_sequence) == ("end_turn", None)


# ---- OpenAI Responses ---------------------------------------------------------------


def test_responses_reasoning_item_and_stream_events(
    stack: Stack, oai: openai.OpenAI, think_daemon: DaemonChild
) -> None:
    r = _post(stack, "responses", input="Hello, how are you?", stream=True)
    events = _sse(r.text)
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    reasoning_deltas = names.count("response.reasoning_text.delta")
    text_deltas = names.count("response.output_text.delta")
    # Both stream as they are written; tokens ready together share a frame, so up to one event per token.
    assert 1 <= reasoning_deltas <= 4
    assert 1 <= text_deltas <= 3
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.reasoning_text.delta"] * reasoning_deltas,
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * text_deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    data = [d for _, d in events]
    assert data[2]["item"]["type"] == "reasoning"
    assert data[3]["part"] == {"type": "reasoning_text", "text": ""}
    assert data[2 + 2 + reasoning_deltas]["text"] == REASONING
    final = data[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": REASONING}]
    assert final["output"][0]["summary"] == []
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == REASONING_TOKENS

    # The SDK parses the same, and a stored response with reasoning continues a conversation.
    response = oai.responses.create(model=MODEL, input="Hello, how are you?")
    assert response.output_text == ANSWER
    reasoning = response.output[0]
    assert reasoning.type == "reasoning"
    assert reasoning.content is not None
    assert reasoning.content[0].text == REASONING
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens == REASONING_TOKENS
    again = oai.responses.create(model=MODEL, input="And then?", previous_response_id=response.id)
    assert again.output_text == ANSWER
    # Reasoning items sent back by a client that keeps its own context are accepted (and dropped).
    history: Any = [
        {"role": "user", "content": "Hello, how are you?"},
        *[item.model_dump(exclude_none=True) for item in response.output],
        {"role": "user", "content": "And then?"},
    ]
    manual = oai.responses.create(model=MODEL, input=history)
    assert manual.output_text == ANSWER
    with oai.responses.stream(model=MODEL, input="Hello, how are you?") as stream:
        kinds = [e.type for e in stream]
        streamed = stream.get_final_response()
    assert "response.reasoning_text.delta" in kinds
    assert streamed.output_text == ANSWER


# ---- the daemon's local API ----------------------------------------------------------


def test_local_api_reports_reasoning_content(think_daemon: DaemonChild) -> None:
    url = f"{think_daemon.api_url}/v1/chat/completions"
    body = httpx.post(url, json={"model": MODEL, "messages": HELLO, "max_tokens": 32}, timeout=60).json()
    assert body["choices"][0]["message"]["reasoning_content"] == REASONING
    assert body["choices"][0]["message"]["content"] == ANSWER
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == REASONING_TOKENS
    streamed = httpx.post(url, json={"model": MODEL, "messages": HELLO, "max_tokens": 32, "stream": True}, timeout=60)
    deltas = [d["choices"][0]["delta"] for _, d in _sse(streamed.text) if d != "[DONE]" and d["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER


# ---- failover: a continuation inside the thinking ------------------------------------


@pytest.mark.parametrize("template", [{}, OPEN], ids=["model-opens", "prompt-opens"])
async def test_continuation_resumes_inside_and_after_the_thinking(
    stack: Stack, think_daemon: DaemonChild, template: dict[str, Any]
) -> None:
    """What a provider says after being handed the first k deltas of an answer, for every k."""
    kwargs = template.get("chat_template_kwargs")
    request = _with(bus_request("think-whole", MODEL, max_tokens=32), chat_template_kwargs=kwargs)
    frames = await bus_call(stack.nats, PROVIDER, request)
    deltas = [f for f in frames if isinstance(f, bus.Delta)]
    (done,) = [f for f in frames if isinstance(f, bus.Done)]
    assert "".join(d.reasoning for d in deltas) == REASONING
    assert "".join(d.text for d in deltas) == ANSWER
    for k in range(1, len(deltas)):
        before = deltas[:k]
        continued = _with(
            request,
            request_id=f"think-cont-{k}",
            continuation=bus.Continuation(
                token_ids=[t for d in before for t in d.token_ids],
                text="".join(d.text for d in before),
                reasoning="".join(d.reasoning for d in before),
            ),
        )
        rest = await bus_call(stack.nats, PROVIDER, continued)
        more = [f for f in rest if isinstance(f, bus.Delta)]
        (finished,) = [f for f in rest if isinstance(f, bus.Done)]
        assert "".join(d.reasoning for d in before + more) == REASONING, k
        assert "".join(d.text for d in before + more) == ANSWER, k
        assert finished.reasoning_tokens == done.reasoning_tokens, k


def _with(request: bus.InferenceRequest, **changes: Any) -> bus.InferenceRequest:
    return msgspec.structs.replace(request, **changes)
