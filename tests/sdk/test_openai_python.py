"""The official `openai` Python SDK against the running stack: chat, completions, Responses.

Every assertion is on what the SDK returns (its parsed objects and stream
events), so a field the SDK cannot parse or an event it does not know fails here.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import openai
import pydantic
import pytest

from infra.components import Child
from tests.support.script_model import CALL_ARGUMENTS, CALL_NAME, SCRIPT_MODEL, TEXT, WEATHER
from tests.support.stack import TINY_MODEL

HELLO: Any = [{"role": "user", "content": "Hello, how are you?"}]


# ---- chat completions --------------------------------------------------------------


def test_chat_sync_with_headers(oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(model=TINY_MODEL, messages=HELLO, max_tokens=8, temperature=0)
    completion = raw.parse()
    assert completion.id == f"chatcmpl-{raw.headers['x-request-id']}"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) >= 0
    assert completion.object == "chat.completion"
    assert completion.model == TINY_MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8


def test_chat_stream_matches_non_stream(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=20, temperature=0)
    stream = oai.chat.completions.create(
        model=TINY_MODEL,
        messages=HELLO,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        user="sdk-test",
        metadata={"suite": "conformance"},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20


async def test_chat_async_concurrent_and_streaming(async_oai: openai.AsyncOpenAI) -> None:
    results = await asyncio.gather(
        *(
            async_oai.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=6, temperature=0)
            for _ in range(3)
        )
    )
    texts = {r.choices[0].message.content for r in results}
    assert len(texts) == 1, "greedy: the same answer three times"
    stream = await async_oai.chat.completions.create(
        model=TINY_MODEL, messages=HELLO, max_tokens=6, temperature=0, stream=True
    )
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert streamed == texts.pop()


def test_chat_logprobs(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model=TINY_MODEL, messages=HELLO, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert len(logprobs.content) == 5
    for item in logprobs.content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 2
        # Greedy: the chosen token is the most likely one.
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs))
    stream = oai.chat.completions.create(
        model=TINY_MODEL, messages=HELLO, max_tokens=5, temperature=0, logprobs=True, stream=True
    )
    streamed = [lp for c in stream if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content or []]
    assert [t.token for t in streamed] == [t.token for t in logprobs.content]


def test_chat_tools(oai: openai.OpenAI, script_daemon: Child) -> None:
    completion = oai.chat.completions.create(
        model=SCRIPT_MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == TEXT
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id
    assert call.function.name == CALL_NAME
    assert json.loads(call.function.arguments) == CALL_ARGUMENTS

    # The SDK's streaming helper accumulates deltas with OpenAI's index/id rules.
    with oai.chat.completions.stream(
        model=SCRIPT_MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "content.delta" in kinds
    assert "tool_calls.function.arguments.done" in kinds
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert message.content == TEXT
    (streamed,) = message.tool_calls or []
    assert streamed.function.name == CALL_NAME
    assert json.loads(streamed.function.arguments) == CALL_ARGUMENTS

    # The round trip: the call and its result go back; the model sees them (a longer prompt).
    round_trip: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": TEXT, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
    ]
    again = oai.chat.completions.create(
        model=SCRIPT_MODEL,
        messages=round_trip,
        tools=[WEATHER],
        tool_choice="auto",
    )
    assert again.usage is not None
    assert completion.usage is not None
    assert again.usage.prompt_tokens > completion.usage.prompt_tokens + 10
    # tool_choice "none" hides the tools: the markup stays plain text.
    plain = oai.chat.completions.create(
        model=SCRIPT_MODEL, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], tool_choice="none"
    )
    assert plain.choices[0].finish_reason == "stop"
    assert plain.choices[0].message.tool_calls is None
    assert "<tool_call>" in (plain.choices[0].message.content or "")


class Town(pydantic.BaseModel):
    """What the SDK's parse() turns into a strict JSON schema and back."""

    name: str = pydantic.Field(max_length=10)
    population: int = pydantic.Field(ge=0, le=5000)
    kind: Literal["city", "town", "village"]
    ports: list[Literal["north", "south"]] = pydantic.Field(max_length=2)


def test_chat_parse_with_a_pydantic_model(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.parse(
        model=TINY_MODEL, messages=HELLO, max_tokens=200, temperature=0, response_format=Town
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Town)
    ok = oai.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=2, response_format={"type": "text"})
    assert ok.choices[0].finish_reason == "length"


# ---- legacy completions ------------------------------------------------------------


def test_completions_sync_stream_and_echo(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model=TINY_MODEL, prompt="The quick", max_tokens=7, temperature=0)
    assert whole.object == "text_completion"
    assert whole.id.startswith("cmpl-")
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 7
    chunks = list(
        oai.completions.create(model=TINY_MODEL, prompt="The quick", max_tokens=7, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    echoed = oai.completions.create(model=TINY_MODEL, prompt="The quick", max_tokens=7, temperature=0, echo=True)
    assert echoed.choices[0].text == "The quick" + whole.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=TINY_MODEL, prompt="def f(", suffix="return 1", max_tokens=3)
    assert err.value.body["param"] == "suffix"  # type: ignore[index]


def test_completions_logprobs(oai: openai.OpenAI) -> None:
    completion = oai.completions.create(model=TINY_MODEL, prompt="The quick", max_tokens=4, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert len(logprobs.tokens or []) == 4
    assert "".join(logprobs.tokens or []) == completion.choices[0].text
    assert all(len(top) == 2 for top in logprobs.top_logprobs or [])
    assert (logprobs.text_offset or [])[0] == 0


# ---- Responses ---------------------------------------------------------------------


def test_responses_previous_response_id_retrieve_delete(oai: openai.OpenAI) -> None:
    first = oai.responses.create(
        model=TINY_MODEL, input="Tell me about the sea.", instructions="Be brief.", max_output_tokens=6, temperature=0
    )
    assert first.id.startswith("resp_")
    assert first.object == "response"
    assert first.status == "incomplete"
    assert first.incomplete_details is not None
    assert first.incomplete_details.reason == "max_output_tokens"
    assert first.output[0].type == "message"
    assert first.output_text
    assert first.usage is not None
    assert first.usage.output_tokens == 6
    second = oai.responses.create(
        model=TINY_MODEL, input="And the sky?", previous_response_id=first.id, max_output_tokens=4, temperature=0
    )
    assert second.previous_response_id == first.id
    assert second.instructions == "Be brief.", "instructions carry forward when omitted"
    assert second.usage is not None
    # The model saw the first turn and its answer: the prompt holds both, and the new question.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    fetched = oai.responses.retrieve(first.id)
    assert fetched.id == first.id
    assert fetched.output_text == first.output_text
    oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as err:
        oai.responses.create(model=TINY_MODEL, input="more", previous_response_id=first.id, max_output_tokens=2)
    assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]
    # store: false answers but keeps nothing.
    unstored = oai.responses.create(model=TINY_MODEL, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(unstored.id)


def test_responses_stream_event_chain(oai: openai.OpenAI, script_daemon: Child) -> None:
    events = list(
        oai.responses.create(model=TINY_MODEL, input="Hello", max_output_tokens=5, temperature=0, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == deltas
    # Stored like a non-stream response, and the SDK's helper sees the same final object.
    assert oai.responses.retrieve(final.id).output_text == deltas
    # The SDK's helper (it waits for response.completed: an answer that ends by itself).
    with oai.responses.stream(model=SCRIPT_MODEL, input="Hello") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final_response = stream.get_final_response()
    assert final_response.status == "completed"
    assert final_response.output_text == "".join(texts)
    assert final_response.output_text.startswith(TEXT)


def test_responses_tools_and_function_call_output(oai: openai.OpenAI, script_daemon: Child) -> None:
    tool: Any = {"type": "function", **WEATHER["function"]}
    first = oai.responses.create(model=SCRIPT_MODEL, input="Weather in Paris?", tools=[tool, {"type": "web_search"}])
    assert [item.type for item in first.output] == ["message", "function_call"]
    assert first.output_text == TEXT
    call = first.output[1]
    assert call.type == "function_call"
    assert call.name == CALL_NAME
    assert json.loads(call.arguments) == CALL_ARGUMENTS
    assert [t.name for t in first.tools if t.type == "function"] == [CALL_NAME], "built-in tools are dropped"

    events = list(oai.responses.create(model=SCRIPT_MODEL, input="Weather in Paris?", tools=[tool], stream=True))
    kinds = [e.type for e in events]
    i = kinds.index("response.function_call_arguments.delta")
    assert kinds[i - 1] == "response.output_item.added"
    assert kinds[i + 1 : i + 3] == ["response.function_call_arguments.done", "response.output_item.done"]
    done = events[i + 1]
    assert done.type == "response.function_call_arguments.done"
    assert json.loads(done.arguments) == CALL_ARGUMENTS
    assert kinds[-1] == "response.completed"

    # The tool's output goes back by previous_response_id: the model's prompt now holds it.
    second = oai.responses.create(
        model=SCRIPT_MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"}],
        tools=[tool],
    )
    assert second.usage is not None
    assert first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_responses_bad_input_names_the_field(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.create(model=TINY_MODEL, input=[{"type": "function_call_output", "output": "x"}])
    assert err.value.body["param"] == "input[0].call_id"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.create(
            model=TINY_MODEL,
            input="hi",
            text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}},
        )
    assert err.value.body["param"] == "text.format.schema"  # type: ignore[index]


def test_responses_parse_with_a_pydantic_model(oai: openai.OpenAI) -> None:
    response = oai.responses.parse(model=TINY_MODEL, input="A town?", temperature=0, text_format=Town, store=False)
    assert response.status == "completed"
    assert isinstance(response.output_parsed, Town)
