"""The provider's events as Anthropic's answer: a message, or its named server-sent events.

The model's tool calls come back as `tool_use` blocks, its thinking as thinking blocks.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from schemas import anthropic, bus
from schemas.bus import Finished
from schemas.sse import named
from services.gateway.pipeline import Event

STOP_REASON: dict[str, anthropic.StopReason] = {
    "stop": "end_turn",
    "cancelled": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
}


def tool_use(call: bus.ToolCall) -> anthropic.ToolUseContent:
    try:
        parsed = json.loads(call.arguments)
    except ValueError:
        parsed = call.arguments
    # Anthropic's input is an object; arguments that are not one are kept under a key rather than lost.
    arguments = parsed if isinstance(parsed, dict) else {"input": parsed}
    tool_id = call.id if call.id.startswith("toolu_") else f"toolu_{call.id.removeprefix('call_')}"
    return anthropic.ToolUseContent(id=tool_id, name=call.name, input=arguments)


class _Blocks:
    """Deltas to content blocks, in order: thinking and text runs as they stream, each tool call as a whole block.

    `feed` returns (kind, index, payload) steps: ("start", i, block), ("thinking", i, str), ("text", i, str),
    ("json", i, str), ("signature", i, ""), ("stop", i, None). Both the stream and the non-stream answer
    are built from them.
    """

    def __init__(self) -> None:
        self.count = 0
        # The block receiving streamed text: "thinking" or "text", and its index.
        self._open: tuple[str, int] | None = None

    def _close(self) -> list[tuple[str, int, Any]]:
        if self._open is None:
            return []
        (kind, index), self._open = self._open, None
        # Anthropic ends every thinking block with its signature; there is none to give here.
        signature = [("signature", index, "")] if kind == "thinking" else []
        return [*signature, ("stop", index, None)]

    def _run(self, kind: str, text: str) -> list[tuple[str, int, Any]]:
        steps: list[tuple[str, int, Any]] = []
        if self._open is None or self._open[0] != kind:
            steps.extend(self._close())
            self._open = (kind, self.count)
            self.count += 1
            block = anthropic.ThinkingContent(thinking="") if kind == "thinking" else anthropic.TextContent(text="")
            steps.append(("start", self._open[1], block))
        steps.append((kind, self._open[1], text))
        return steps

    def feed(self, delta: bus.Delta) -> list[tuple[str, int, Any]]:
        steps: list[tuple[str, int, Any]] = []
        # A frame's reasoning came before its text.
        if delta.reasoning:
            steps.extend(self._run("thinking", delta.reasoning))
        if delta.text:
            steps.extend(self._run("text", delta.text))
        for call in delta.tool_calls:
            steps.extend(self._close())
            block = tool_use(call)
            index = self.count
            self.count += 1
            steps.append(("start", index, anthropic.ToolUseContent(id=block.id, name=block.name, input={})))
            steps.append(("json", index, json.dumps(block.input, ensure_ascii=False)))
            steps.append(("stop", index, None))
        return steps

    def finish(self) -> list[tuple[str, int, Any]]:
        if self.count == 0:
            # An empty answer is still one (empty) text block, as Anthropic sends it.
            self.count = 1
            return [("start", 0, anthropic.TextContent(text="")), ("stop", 0, None)]
        return self._close()


def _stop(event: Finished) -> tuple[anthropic.StopReason, str | None]:
    """stop_reason and stop_sequence: which of the request's stop_sequences ended the answer, if one did."""
    if event.stop_sequence is not None:
        return "stop_sequence", event.stop_sequence
    return STOP_REASON[event.finish_reason], None


class Shape:
    def __init__(self, message_id: str, model: str, prompt_tokens: int) -> None:
        self.id = message_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.started = time.time()

    @staticmethod
    def usage(event: Finished) -> anthropic.Usage:
        # Anthropic counts cached prompt tokens apart: input + cache_read is the whole prompt.
        return anthropic.Usage(
            input_tokens=event.prompt_tokens - event.cached_tokens,
            output_tokens=event.completion_tokens,
            cache_read_input_tokens=event.cached_tokens,
        )

    async def collect(self, events: AsyncIterator[Event]) -> anthropic.Message:
        blocks = _Blocks()
        steps: list[tuple[str, int, Any]] = []
        async for event in events:
            if not isinstance(event, Finished):
                steps.extend(blocks.feed(event))
                continue
            steps.extend(blocks.finish())
            stop_reason, stop_sequence = _stop(event)
            return anthropic.Message(
                id=self.id,
                model=self.model,
                content=_content(steps),
                stop_reason=stop_reason,
                stop_sequence=stop_sequence,
                usage=self.usage(event),
            )
        raise AssertionError("pipeline.events always ends with Finished")


def _content(steps: list[tuple[str, int, Any]]) -> list[anthropic.ContentBlock]:
    """The blocks the steps of a whole answer build."""
    started: list[anthropic.ContentBlock] = []
    pieces: dict[int, list[str]] = {}
    for kind, index, payload in steps:
        if kind == "start":
            started.append(payload)
        elif kind in ("text", "json", "thinking"):
            pieces.setdefault(index, []).append(payload)
    content: list[anthropic.ContentBlock] = []
    for index, block in enumerate(started):
        joined = "".join(pieces.get(index, []))
        if isinstance(block, anthropic.ToolUseContent):
            content.append(anthropic.ToolUseContent(id=block.id, name=block.name, input=json.loads(joined)))
        elif isinstance(block, anthropic.ThinkingContent):
            content.append(anthropic.ThinkingContent(thinking=joined))
        else:
            content.append(anthropic.TextContent(text=joined))
    return content


class Events:
    """Anthropic's event grammar: message_start, ping, content blocks, message_delta, message_stop."""

    def __init__(self, shape: Shape) -> None:
        self._shape = shape

    async def render(self, events: AsyncIterator[Event]) -> AsyncGenerator[bytes, None]:
        shape = self._shape
        start = anthropic.Message(
            id=shape.id,
            model=shape.model,
            content=[],
            stop_reason=None,
            usage=anthropic.Usage(input_tokens=shape.prompt_tokens, output_tokens=0),
        )
        yield named("message_start", anthropic.MessageStart(message=start))
        yield named("ping", anthropic.Ping())
        blocks = _Blocks()
        async for event in events:
            if not isinstance(event, Finished):
                for step in blocks.feed(event):
                    yield _step(step)
                continue
            for step in blocks.finish():
                yield _step(step)
            usage = shape.usage(event)
            stop_reason, stop_sequence = _stop(event)
            yield named(
                "message_delta",
                anthropic.MessageDelta(
                    delta=anthropic.MessageDeltaBody(stop_reason=stop_reason, stop_sequence=stop_sequence),
                    usage=anthropic.DeltaUsage(
                        output_tokens=usage.output_tokens,
                        input_tokens=usage.input_tokens,
                        cache_read_input_tokens=usage.cache_read_input_tokens,
                    ),
                ),
            )
            yield named("message_stop", anthropic.MessageStop())

    def failed(self, code: str, message: str) -> list[bytes]:
        error = anthropic.ErrorBody(type="api_error", message=f"{message} ({code})")
        return [named("error", anthropic.ErrorResponse(error=error))]


def _step(step: tuple[str, int, Any]) -> bytes:
    kind, index, payload = step
    if kind == "start":
        return named("content_block_start", anthropic.ContentBlockStart(index=index, content_block=payload))
    if kind == "text":
        return named(
            "content_block_delta", anthropic.ContentBlockDelta(index=index, delta=anthropic.TextDelta(text=payload))
        )
    if kind == "json":
        return named(
            "content_block_delta",
            anthropic.ContentBlockDelta(index=index, delta=anthropic.InputJsonDelta(partial_json=payload)),
        )
    if kind == "thinking":
        return named(
            "content_block_delta", anthropic.ContentBlockDelta(index=index, delta=anthropic.ThinkingDelta(payload))
        )
    if kind == "signature":
        return named(
            "content_block_delta", anthropic.ContentBlockDelta(index=index, delta=anthropic.SignatureDelta(payload))
        )
    return named("content_block_stop", anthropic.ContentBlockStop(index=index))
