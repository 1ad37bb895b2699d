"""POST /v1/chat/completions: OpenAI's chat surface over the shared pipeline."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.di import NamedDependency

from schemas import bus, openai
from schemas.openai_bus import FINISH, chat_request, token_logprobs, tool_calls, usage
from services.auth.bearer import Principal
from services.auth.declared import Auth, requires
from services.gateway import pipeline
from services.gateway.pipeline import Event, Finished, Job
from services.gateway.requests import decode_body
from services.gateway.sse import DONE, ChunkWriter
from services.openapi import GATEWAY_ERRORS, documented
from services.runtime import Runtime


@post(
    "/v1/chat/completions",
    status_code=200,
    **documented(
        ok=openai.ChatCompletion,
        body=openai.ChatCompletionRequest,
        errors=GATEWAY_ERRORS,
        stream=True,
    ),
    **requires(Auth.API_KEY_OR_DEMO),
)
async def chat_completions(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[Any]:
    decoded: list[openai.ChatCompletionRequest] = []

    async def prepare(principal: Principal, body: bytes) -> Job:
        req = decode_body(body, openai.ChatCompletionRequest)
        decoded.append(req)
        return Job(
            chat_request(req, default_max_tokens=runtime.settings.default_max_tokens),
            req.stream,
            [m.text() for m in req.messages],
        )

    started = await pipeline.start(request, runtime, event="chat_completion", allow_demo=True, prepare=prepare)
    req = decoded[0]
    writer = ChunkWriter(f"chatcmpl-{started.ex.request_id}", int(time.time()), req.model)
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return pipeline.stream(runtime, started, _Chunks(writer, include_usage=include_usage, logprobs=req.logprobs))
    completion = await pipeline.answer(request, runtime, started, lambda events: _collect(events, writer, req))
    return Response(completion, headers=started.headers)


async def _collect(
    events: AsyncIterator[Event], writer: ChunkWriter, req: openai.ChatCompletionRequest
) -> openai.ChatCompletion:
    parts: list[str] = []
    reasoning: list[str] = []
    calls: list[bus.ToolCall] = []
    logprobs: list[bus.TokenLogprob] = []
    async for event in events:
        if not isinstance(event, Finished):
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
            logprobs=openai.ChoiceLogprobs(content=token_logprobs(logprobs)) if req.logprobs else None,
        )
        return openai.ChatCompletion(
            id=writer.completion_id,
            created=writer.created,
            model=writer.model,
            choices=[choice],
            usage=usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens, event.reasoning_tokens),
        )
    raise AssertionError("pipeline.events always ends with Finished")


class _Chunks:
    """chat.completion.chunk events, then `data: [DONE]`."""

    def __init__(self, writer: ChunkWriter, *, include_usage: bool, logprobs: bool) -> None:
        self._writer = writer
        self._include_usage = include_usage
        self._logprobs = logprobs

    async def render(self, events: AsyncIterator[Event]) -> AsyncGenerator[bytes, None]:
        w = self._writer
        yield w.role()
        async for event in events:
            if isinstance(event, Finished):
                yield w.finish(FINISH[event.finish_reason])
                if self._include_usage:
                    u = usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens, event.reasoning_tokens)
                    yield w.usage(u)
                continue
            if event.reasoning:
                yield w.reasoning(event.reasoning)
            lp = openai.ChoiceLogprobs(content=token_logprobs(event.logprobs)) if self._logprobs else None
            if event.text or (lp is not None and event.logprobs):
                yield w.content(event.text, lp)
            if event.tool_calls:
                yield w.tool_calls(tool_calls(event.tool_calls))
        yield DONE

    def failed(self, code: str, message: str) -> list[bytes]:
        error = openai.ChunkError(message=message, type="api_error", code=code)
        return [self._writer.error(error), DONE]
