"""POST /v1/chat/completions on the local API: the same engine as the pool, OpenAI's chat format."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, post

from daemon.api.common import (
    DONE,
    FINISH,
    LocalRequests,
    collected,
    decode,
    engine_error,
    sse,
    streamed,
    usage,
)
from daemon.engine.base import EngineError, Finished, Prepared
from schemas import bus, openai, openai_bus

# When a local request sets no limit (the gateway has its own default for pool requests).
DEFAULT_CHAT_MAX_TOKENS = 1024


def chat_routes(local: LocalRequests) -> list[Any]:
    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request[Any, Any, Any]) -> Response[Any]:
        req = decode(await request.body(), openai.ChatCompletionRequest)
        request_id = secrets.token_hex(12)
        prepared = await local.prepare(
            lambda model_id: openai_bus.chat_request(
                req, default_max_tokens=DEFAULT_CHAT_MAX_TOKENS, model=model_id, request_id=request_id
            )
        )
        created = int(time.time())
        cid = f"chatcmpl-{request_id}"
        model = prepared.request.model
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return streamed(request_id, _stream(prepared, cid, created, model, include_usage=include_usage))
        return await collected(request, request_id, _collect(prepared, cid, created, model))

    async def _collect(prepared: Prepared, cid: str, created: int, model: str) -> openai.ChatCompletion:
        text: list[str] = []
        reasoning: list[str] = []
        calls: list[bus.ToolCall] = []
        logprobs: list[bus.TokenLogprob] = []
        finished: Finished | None = None
        try:
            async for event in local.events(prepared):
                if isinstance(event, Finished):
                    finished = event
                else:
                    text.append(event.text)
                    reasoning.append(event.reasoning)
                    calls.extend(event.tool_calls)
                    logprobs.extend(event.logprobs)
        except EngineError as exc:
            raise engine_error(exc) from None
        assert finished is not None
        message = openai.AssistantMessage(
            content="".join(text),
            tool_calls=openai_bus.tool_calls(calls) if calls else None,
            reasoning_content="".join(reasoning) or msgspec.UNSET,
        )
        choice = openai.Choice(
            index=0,
            message=message,
            finish_reason=FINISH[finished.finish_reason],
            logprobs=openai.ChoiceLogprobs(content=openai_bus.token_logprobs(logprobs))
            if prepared.request.params.logprobs
            else None,
        )
        return openai.ChatCompletion(id=cid, created=created, model=model, choices=[choice], usage=usage(finished))

    async def _stream(
        prepared: Prepared, cid: str, created: int, model: str, *, include_usage: bool
    ) -> AsyncIterator[bytes]:
        def chunk(delta: openai.Delta, finish: openai.FinishReason | None = None, **extra: Any) -> bytes:
            return sse(
                openai.ChatCompletionChunk(
                    id=cid,
                    object="chat.completion.chunk",
                    created=created,
                    model=model,
                    choices=[openai.ChunkChoice(index=0, delta=delta, finish_reason=finish, **extra)],
                )
            )

        want_logprobs = prepared.request.params.logprobs
        tool_index = 0
        yield chunk(openai.Delta(role="assistant", content=""))
        try:
            async for event in local.events(prepared):
                if isinstance(event, Finished):
                    yield chunk(openai.Delta(), FINISH[event.finish_reason])
                    if include_usage:
                        yield sse(
                            openai.ChatCompletionChunk(
                                id=cid,
                                object="chat.completion.chunk",
                                created=created,
                                model=model,
                                choices=[],
                                usage=usage(event),
                            )
                        )
                    continue
                if event.reasoning:
                    yield chunk(openai.Delta(reasoning_content=event.reasoning))
                lp = (
                    openai.ChoiceLogprobs(content=openai_bus.token_logprobs(list(event.logprobs)))
                    if want_logprobs and event.logprobs
                    else None
                )
                if event.text or lp is not None:
                    yield chunk(openai.Delta(content=event.text), logprobs=lp)
                if event.tool_calls:
                    deltas = []
                    for call in event.tool_calls:
                        deltas.append(
                            openai.ToolCallDelta(
                                index=tool_index,
                                id=call.id,
                                function=openai.FunctionCall(name=call.name, arguments=call.arguments),
                            )
                        )
                        tool_index += 1
                    yield chunk(openai.Delta(tool_calls=deltas))
            yield DONE
        except EngineError as exc:
            # Headers are sent already: the error goes in-band, then the stream ends properly.
            err = openai.ChunkError(message=f"Generation failed: {exc.message}", type="api_error", code=exc.code)
            yield sse(
                openai.ChatCompletionChunk(
                    id=cid,
                    object="chat.completion.chunk",
                    created=created,
                    model=model,
                    choices=[openai.ChunkChoice(index=0, delta=openai.Delta(), finish_reason="error")],
                    error=err,
                )
            )
            yield DONE

    return [chat]
