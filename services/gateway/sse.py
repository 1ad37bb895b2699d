"""OpenAI's server-sent-event framing for chat completion chunks."""

from __future__ import annotations

from schemas import openai, sse

DONE = sse.DONE
_MARKER = "\x00text\x00"
_MARKER_JSON = b'"\\u0000text\\u0000"'
data = sse.data
named = sse.named


def event(chunk: openai.ChatCompletionChunk) -> bytes:
    return data(chunk)


class ChunkWriter:
    """Builds the chunks of one completion (shared id, created and model)."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model
        # OpenAI numbers a response's tool calls 0, 1, ... across all chunks.
        self._tool_index = 0
        # A plain content chunk's bytes around its text, made once per answer (see content()).
        self._around_text: tuple[bytes, bytes] | None = None

    def _chunk(
        self,
        choices: list[openai.ChunkChoice],
        *,
        usage: openai.Usage | None = None,
        error: openai.ChunkError | None = None,
    ) -> bytes:
        return event(
            openai.ChatCompletionChunk(
                id=self.completion_id,
                object="chat.completion.chunk",
                created=self.created,
                model=self.model,
                choices=choices,
                usage=usage,
                error=error,
            )
        )

    def role(self) -> bytes:
        return self._chunk([openai.ChunkChoice(index=0, delta=openai.Delta(role="assistant", content=""))])

    def content(self, text: str, logprobs: openai.ChoiceLogprobs | None = None) -> bytes:
        if logprobs is not None:
            return self._chunk([openai.ChunkChoice(index=0, delta=openai.Delta(content=text), logprobs=logprobs)])
        # The hot path (one per frame): the same bytes as the chunk struct would give, but only the
        # text is encoded; the rest was encoded once, around a marker no JSON string contains raw.
        if self._around_text is None:
            whole = self._chunk([openai.ChunkChoice(index=0, delta=openai.Delta(content=_MARKER))])
            before, _, after = whole.rpartition(_MARKER_JSON)
            self._around_text = (before, after)
        before, after = self._around_text
        return before + sse.json_text(text) + after

    def reasoning(self, text: str) -> bytes:
        return self._chunk([openai.ChunkChoice(index=0, delta=openai.Delta(reasoning_content=text))])

    def tool_calls(self, calls: list[openai.ToolCall]) -> bytes:
        """Complete calls, each with its index and id in its one delta (OpenAI's first-delta shape)."""
        deltas = []
        for call in calls:
            deltas.append(openai.ToolCallDelta(index=self._tool_index, id=call.id, function=call.function))
            self._tool_index += 1
        return self._chunk([openai.ChunkChoice(index=0, delta=openai.Delta(tool_calls=deltas))])

    def finish(self, reason: openai.FinishReason) -> bytes:
        return self._chunk([openai.ChunkChoice(index=0, delta=openai.Delta(), finish_reason=reason)])

    def usage(self, usage: openai.Usage) -> bytes:
        # As OpenAI does with include_usage: one extra chunk with no choices.
        return self._chunk([], usage=usage)

    def error(self, error: openai.ChunkError) -> bytes:
        return self._chunk(
            [openai.ChunkChoice(index=0, delta=openai.Delta(), finish_reason="error")],
            error=error,
        )
