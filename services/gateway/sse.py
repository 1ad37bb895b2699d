"""OpenAI's server-sent-event framing for chat completion chunks."""

from __future__ import annotations

import msgspec

from schemas import openai

_ENCODER = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def event(chunk: openai.ChatCompletionChunk) -> bytes:
    return b"data: " + _ENCODER.encode(chunk) + b"\n\n"


class ChunkWriter:
    """Builds the chunks of one completion (shared id, created and model)."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model

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

    def content(self, text: str) -> bytes:
        return self._chunk([openai.ChunkChoice(index=0, delta=openai.Delta(content=text))])

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
