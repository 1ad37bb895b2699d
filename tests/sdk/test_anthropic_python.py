"""The official `anthropic` Python SDK against /v1/messages: messages, streaming, tools, errors."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from infra.components import Child
from tests.support.accounts import make_account
from tests.support.script_model import CALL_ARGUMENTS, CALL_NAME, SCRIPT_MODEL, TEXT
from tests.support.stack import TINY_MODEL, Stack

HELLO: Any = [{"role": "user", "content": "Hello, how are you?"}]
# This SDK version no longer has sampling arguments; older ones (and other clients) send them in the body.
GREEDY = {"temperature": 0, "top_k": 1}
WEATHER: Any = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def test_message(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=TINY_MODEL, max_tokens=8, extra_body=GREEDY, system="Be kind.", messages=HELLO, stop_sequences=["\n\n\n"]
    )
    assert message.id.startswith("msg_")
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == TINY_MODEL
    assert message.stop_reason == "max_tokens"
    (block,) = message.content
    assert block.type == "text"
    assert message.usage.output_tokens == 8
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 5
    assert message._request_id == message.id.removeprefix("msg_")


def test_stream_events_and_final_message(claude: anthropic.Anthropic) -> None:
    whole = claude.messages.create(model=TINY_MODEL, max_tokens=12, extra_body=GREEDY, messages=HELLO)
    events = list(
        claude.messages.create(model=TINY_MODEL, max_tokens=12, extra_body=GREEDY, messages=HELLO, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    start = events[0]
    assert start.type == "message_start"
    assert start.message.usage.input_tokens > 5
    assert start.message.stop_reason is None
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert all(d.type == "text_delta" for d in deltas)
    text = "".join(d.text for d in deltas if d.type == "text_delta")
    assert text == whole.content[0].text  # type: ignore[union-attr]
    delta = events[-2]
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "max_tokens"
    assert delta.usage.output_tokens == 12
    # The SDK's accumulating helper builds the same message.
    with claude.messages.stream(model=TINY_MODEL, max_tokens=12, extra_body=GREEDY, messages=HELLO) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 12


def test_tools_blocks_and_round_trip(claude: anthropic.Anthropic, script_daemon: Child) -> None:
    ask: Any = [{"role": "user", "content": "Weather in Paris?"}]
    message = claude.messages.create(model=SCRIPT_MODEL, max_tokens=64, messages=ask, tools=[WEATHER])
    assert message.stop_reason == "tool_use"
    text, use = message.content
    assert text.type == "text"
    assert text.text == TEXT
    assert use.type == "tool_use"
    assert use.name == CALL_NAME
    assert use.input == CALL_ARGUMENTS
    assert use.id.startswith("toolu_")

    with claude.messages.stream(model=SCRIPT_MODEL, max_tokens=64, messages=ask, tools=[WEATHER]) as stream:
        kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in stream]
        final = stream.get_final_message()
    assert ("content_block_delta", "input_json_delta") in kinds
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[1].input == CALL_ARGUMENTS  # type: ignore[union-attr]

    # The round trip: tool_use back in the assistant turn, tool_result in the next user turn.
    round_trip: Any = [
        *ask,
        {"role": "assistant", "content": [b.model_dump() for b in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C and sunny"}]},
    ]
    again = claude.messages.create(
        model=SCRIPT_MODEL, max_tokens=64, tools=[WEATHER], tool_choice={"type": "auto"}, messages=round_trip
    )
    assert again.usage.input_tokens + (again.usage.cache_read_input_tokens or 0) > message.usage.input_tokens + 10
    # tool_choice none: no tools offered, the markup is plain text.
    plain = claude.messages.create(
        model=SCRIPT_MODEL, max_tokens=64, messages=ask, tools=[WEATHER], tool_choice={"type": "none"}
    )
    assert plain.stop_reason == "end_turn"
    assert [b.type for b in plain.content] == ["text"]


def test_errors_in_anthropic_shape(claude: anthropic.Anthropic, stack: Stack) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=TINY_MODEL, max_tokens=0, messages=HELLO)
    assert bad.value.status_code == 400
    body: Any = bad.value.body
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.OverloadedError) as busy:
        claude.messages.create(model="no-such-model", max_tokens=4, messages=HELLO)
    assert busy.value.status_code == 529
    assert busy.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    wrong = anthropic.Anthropic(base_url=stack.base_url, api_key="mp_wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        wrong.messages.create(model=TINY_MODEL, max_tokens=4, messages=HELLO)
    assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def test_bearer_auth_works_too(stack: Stack) -> None:
    account = make_account(stack.database_url)
    client = anthropic.Anthropic(base_url=stack.base_url, auth_token=account.key, max_retries=0)
    message = client.messages.create(model=TINY_MODEL, max_tokens=3, messages=HELLO)
    assert message.usage.output_tokens == 3
