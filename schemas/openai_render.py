"""OpenAI's chat and text completion answers, rendered from the bus's pieces.

One rendering for both places that answer in OpenAI's format: the gateway (a
provider's `Delta` frames, metered) and the daemon's local API (the engine's
`TextChunk`s). A renderer reads the events (pieces, then one `bus.Finished`) into
one response body (`collect`) or server-sent events ending in `data: [DONE]`
(`render`); `failed` is the in-band error of a stream whose headers are gone.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Protocol

import msgspec

from schemas import bus, openai, sse
from schemas.openai_bus import FINISH, completion_logprobs, token_logprobs, tool_calls


class Piece(Protocol):
    """New text of an answer: a bus `Delta` or the engine's `TextChunk`."""

    @property
    def text(self) -> str: ...

    @property
    def reasoning(self) -> str: ...

    @property
    def tool_calls(self) -> Sequence[bus.ToolCall]: ...

    @property
    def logprobs(self) -> Sequence[bus.TokenLogprob]: ...


Event = Piece | bus.Finished


# A content chunk is encoded once around this marker; only the text is encoded per chunk after that.
_MARKER = "\x00text\x00"
_MARKER_JSON = b'"\\u0000text\\u0000"'


def usage(f: bus.Finished) -> openai.Usage:
    return openai.Usage(
        prompt_tokens=f.prompt_tokens,
        completion_tokens=f.completion_tokens,
        total_tokens=f.prompt_tokens + f.completion_tokens,
        prompt_tokens_details=openai.PromptTokensDetails(cached_tokens=f.cached_tokens),
        completion_tokens_details=openai.CompletionTokensDetails(reasoning_tokens=f.reasoning_tokens),
    )


def _error(message: str, code: str) -> openai.ChunkError:
    return openai.ChunkError(message=message, type="api_error", code=code)


class ChatRender:
    """One chat completion: its id, clock and model, shared by every chunk."""

    def __init__(
        self, completion_id: str, created: int, model: str, *, logprobs: bool = False, include_usage: bool = False
    ) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self._logprobs = logprobs
        self._include_usage = include_usage
        # OpenAI numbers a response's tool calls 0, 1, ... across all chunks.
        self._tool_index = 0
        # A plain content chunk's bytes around its text, made once per answer (see content()).
        self._around_text: tuple[bytes, bytes] | None = None

    async def collect(self, events: AsyncIterator[Event]) -> openai.ChatCompletion:
        parts: list[str] = []
        reasoning: list[str] = []
        calls: list[bus.ToolCall] = []
        logprobs: list[bus.TokenLogprob] = []
        async for event in events:
            if not isinstance(event, bus.Finished):
                parts.append(event.text)
                reasoning.append(event.reasoning)
                calls.extend(event.tool_calls)
                logprobs.extend(event.logprobs)
                continue
            text = "".join(parts)
            message = openai.AssistantMessage(
                # As OpenAI: no content, not an empty one, when the answer is only tool calls.
                content=None if calls and not text else text,
                tool_calls=tool_calls(calls) or None,
                reasoning_content="".join(reasoning) or msgspec.UNSET,
            )
            choice = openai.Choice(
                index=0,
                message=message,
                finish_reason=FINISH[event.finish_reason],
                logprobs=openai.ChoiceLogprobs(content=token_logprobs(logprobs)) if self._logprobs else None,
            )
            return openai.ChatCompletion(
                id=self.completion_id, created=self.created, model=self.model, choices=[choice], usage=usage(event)
            )
        raise AssertionError("the events always end with Finished")

    async def render(self, events: AsyncIterator[Event]) -> AsyncGenerator[bytes, None]:
        yield self.role()
        async for event in events:
            if isinstance(event, bus.Finished):
                yield self.finish(FINISH[event.finish_reason])
                if self._include_usage:
                    yield self.usage(usage(event))
                continue
            if event.reasoning:
                yield self.reasoning(event.reasoning)
            lp = openai.ChoiceLogprobs(content=token_logprobs(list(event.logprobs))) if self._logprobs else None
            if event.text or (lp is not None and event.logprobs):
                yield self.content(event.text, lp)
            if event.tool_calls:
                yield self.tool_calls(tool_calls(list(event.tool_calls)))
        yield sse.DONE

    def failed(self, code: str, message: str) -> list[bytes]:
        return [self.error(_error(message, code)), sse.DONE]

    # ---- one chunk each --------------------------------------------------------------

    def _chunk(
        self,
        choices: list[openai.ChunkChoice],
        *,
        usage: openai.Usage | None = None,
        error: openai.ChunkError | None = None,
    ) -> bytes:
        return sse.data(
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
        return self._chunk([openai.ChunkChoice(index=0, delta=openai.Delta(), finish_reason="error")], error=error)


class CompletionRender:
    """One legacy text completion: id, clock, model and the options every part shares."""

    def __init__(
        self,
        completion_id: str,
        created: int,
        model: str,
        *,
        prompt: str = "",
        echo: bool = False,
        logprobs: int | None = None,
        include_usage: bool = False,
    ) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model
        # echo: the prompt comes back before the completion (refused with logprobs: openai_bus).
        self._echo = echo
        self._prompt = prompt
        self._logprobs = logprobs
        self._include_usage = include_usage

    def completion(
        self,
        choices: list[openai.CompletionChoice],
        *,
        usage: openai.Usage | None = None,
        error: openai.ChunkError | None = None,
    ) -> openai.Completion:
        return openai.Completion(
            id=self.completion_id,
            object="text_completion",
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            error=error,
        )

    def _logprobs_of(self, items: list[bus.TokenLogprob], offset: int) -> openai.CompletionLogprobs | None:
        if self._logprobs is None:
            return None
        return completion_logprobs(items, offset, with_top=bool(self._logprobs))

    async def collect(self, events: AsyncIterator[Event]) -> openai.Completion:
        parts = [self._prompt] if self._echo else []
        logprobs: list[bus.TokenLogprob] = []
        async for event in events:
            if not isinstance(event, bus.Finished):
                parts.append(event.text)
                logprobs.extend(event.logprobs)
                continue
            choice = openai.CompletionChoice(
                index=0,
                text="".join(parts),
                finish_reason=FINISH[event.finish_reason],
                logprobs=self._logprobs_of(logprobs, 0),
            )
            return self.completion([choice], usage=usage(event))
        raise AssertionError("the events always end with Finished")

    def _chunk(self, text: str, **extra: Any) -> bytes:
        return sse.data(self.completion([openai.CompletionChoice(index=0, text=text, **extra)]))

    async def render(self, events: AsyncIterator[Event]) -> AsyncGenerator[bytes, None]:
        offset = 0
        if self._echo:
            yield self._chunk(self._prompt, finish_reason=None)
            offset = len(self._prompt)
        async for event in events:
            if isinstance(event, bus.Finished):
                yield self._chunk("", finish_reason=FINISH[event.finish_reason])
                if self._include_usage:
                    yield sse.data(self.completion([], usage=usage(event)))
                continue
            if event.text or event.logprobs:
                lp = self._logprobs_of(list(event.logprobs), offset)
                offset += len(event.text)
                yield self._chunk(event.text, finish_reason=None, logprobs=lp)
        yield sse.DONE

    def failed(self, code: str, message: str) -> list[bytes]:
        choice = openai.CompletionChoice(index=0, text="", finish_reason="error")
        return [sse.data(self.completion([choice], error=_error(message, code))), sse.DONE]
