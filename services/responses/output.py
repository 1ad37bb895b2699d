"""The model's deltas as Responses output items, and the numbered stream events that build them.

Reasoning streams into a reasoning item (its text as one `reasoning_text`
content part: raw reasoning, not a summary, so `response.reasoning_text.*`
events), text into a message item, as they come; each tool call is a whole
function_call item. The non-stream answer is built by the same code, so both
carry the same items in the same order.
"""

from __future__ import annotations

import secrets

import msgspec

from schemas import bus, responses


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class Output:
    def __init__(self) -> None:
        self.items: list[responses.OutputItem] = []
        self._seq = 0
        # The message item receiving text: its id, output index and text so far.
        self._message: tuple[str, int, list[str]] | None = None
        # The reasoning item receiving reasoning, likewise.
        self._reasoning: tuple[str, int, list[str]] | None = None

    def seq(self) -> int:
        """The next event's sequence_number (0, 1, ... across the whole stream)."""
        n, self._seq = self._seq, self._seq + 1
        return n

    def feed(self, delta: bus.Delta) -> list[msgspec.Struct]:
        events: list[msgspec.Struct] = []
        # A frame's reasoning came before its text.
        if delta.reasoning:
            if self._reasoning is None:
                events.extend(self._close_message())
                events.extend(self._open_reasoning())
            assert self._reasoning is not None
            rid, index, texts = self._reasoning
            texts.append(delta.reasoning)
            events.append(
                responses.ReasoningTextDelta(
                    sequence_number=self.seq(), item_id=rid, output_index=index, content_index=0, delta=delta.reasoning
                )
            )
        if delta.text:
            events.extend(self._close_reasoning())
            if self._message is None:
                events.extend(self._open_message())
            assert self._message is not None
            mid, index, texts = self._message
            texts.append(delta.text)
            events.append(
                responses.TextDelta(
                    sequence_number=self.seq(), item_id=mid, output_index=index, content_index=0, delta=delta.text
                )
            )
        for call in delta.tool_calls:
            events.extend(self._close_reasoning())
            events.extend(self._close_message())
            events.extend(self._function_call(call))
        return events

    def finish(self) -> list[msgspec.Struct]:
        events = self._close_reasoning()
        # An answer with no output at all is still one (empty) message, as OpenAI sends it.
        if not any(not isinstance(i, responses.ReasoningItem) for i in self.items) and self._message is None:
            events.extend(self._open_message())
        return events + self._close_message()

    def _open_reasoning(self) -> list[msgspec.Struct]:
        rid, index = item_id("rs"), len(self.items)
        self._reasoning = (rid, index, [])
        return [
            responses.ItemAdded(
                sequence_number=self.seq(),
                output_index=index,
                item=responses.ReasoningItem(id=rid, summary=[], content=[], status="in_progress"),
            ),
            responses.PartAdded(
                sequence_number=self.seq(),
                item_id=rid,
                output_index=index,
                content_index=0,
                part=responses.ReasoningText(text=""),
            ),
        ]

    def _close_reasoning(self) -> list[msgspec.Struct]:
        if self._reasoning is None:
            return []
        rid, index, texts = self._reasoning
        self._reasoning = None
        part = responses.ReasoningText(text="".join(texts))
        item = responses.ReasoningItem(id=rid, summary=[], content=[part])
        self.items.append(item)
        return [
            responses.ReasoningTextDone(
                sequence_number=self.seq(), item_id=rid, output_index=index, content_index=0, text=part.text
            ),
            responses.PartDone(sequence_number=self.seq(), item_id=rid, output_index=index, content_index=0, part=part),
            responses.ItemDone(sequence_number=self.seq(), output_index=index, item=item),
        ]

    def _open_message(self) -> list[msgspec.Struct]:
        mid, index = item_id("msg"), len(self.items)
        self._message = (mid, index, [])
        return [
            responses.ItemAdded(
                sequence_number=self.seq(),
                output_index=index,
                item=responses.OutputMessage(id=mid, content=[], status="in_progress"),
            ),
            responses.PartAdded(
                sequence_number=self.seq(),
                item_id=mid,
                output_index=index,
                content_index=0,
                part=responses.OutputText(text=""),
            ),
        ]

    def _close_message(self) -> list[msgspec.Struct]:
        if self._message is None:
            return []
        mid, index, texts = self._message
        self._message = None
        part = responses.OutputText(text="".join(texts))
        item = responses.OutputMessage(id=mid, content=[part])
        self.items.append(item)
        return [
            responses.TextDone(
                sequence_number=self.seq(), item_id=mid, output_index=index, content_index=0, text=part.text
            ),
            responses.PartDone(sequence_number=self.seq(), item_id=mid, output_index=index, content_index=0, part=part),
            responses.ItemDone(sequence_number=self.seq(), output_index=index, item=item),
        ]

    def _function_call(self, call: bus.ToolCall) -> list[msgspec.Struct]:
        item = responses.FunctionCall(id=item_id("fc"), call_id=call.id, name=call.name, arguments=call.arguments)
        index = len(self.items)
        self.items.append(item)
        pending = msgspec.structs.replace(item, arguments="", status="in_progress")
        return [
            responses.ItemAdded(sequence_number=self.seq(), output_index=index, item=pending),
            responses.ArgumentsDelta(
                sequence_number=self.seq(), item_id=item.id, output_index=index, delta=call.arguments
            ),
            responses.ArgumentsDone(
                sequence_number=self.seq(),
                item_id=item.id,
                output_index=index,
                arguments=call.arguments,
                name=call.name,
            ),
            responses.ItemDone(sequence_number=self.seq(), output_index=index, item=item),
        ]
