"""POST /v1/chat/completions: authenticate, validate, dispatch over NATS, answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from litestar import Request, Response, post
from litestar.response import Stream

from schemas import bus, openai
from services.auth.bearer import authenticate
from services.errors import ApiError, ProviderError
from services.gateway.dispatch import Call, StreamBroken
from services.gateway.requests import decode_body
from services.gateway.sse import DONE, ChunkWriter
from services.ids import request_id_of
from services.runtime import Runtime

log = structlog.get_logger("gateway")

T = TypeVar("T")

_FINISH: dict[str, openai.FinishReason] = {"stop": "stop", "length": "length", "cancelled": "stop"}


@dataclass
class Outcome:
    """What the summary log line says about one request."""

    request_id: str
    key_id: int | None = None
    model: str | None = None
    stream: bool = False
    started: float = field(default_factory=time.monotonic)
    provider: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float | None = None
    status: str = "ok"

    def log(self) -> None:
        log.info(
            "chat_completion",
            request_id=self.request_id,
            key_id=self.key_id,
            model=self.model,
            provider=self.provider,
            stream=self.stream,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            ttft_ms=None if self.ttft_ms is None else round(self.ttft_ms, 1),
            duration_ms=round((time.monotonic() - self.started) * 1000, 1),
            status=self.status,
        )


def _bus_request(req: openai.ChatCompletionRequest, request_id: str, rt: Runtime) -> bus.InferenceRequest:
    limit = req.token_limit() or rt.settings.default_max_tokens
    deadline_ms = int((time.time() + rt.settings.request_timeout_s) * 1000)
    return bus.InferenceRequest(
        request_id=request_id,
        model=req.model,
        messages=[bus.BusMessage(role=m.role, content=m.text()) for m in req.messages],
        params=bus.SamplingParams(
            max_tokens=limit,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            stop=req.stop_list(),
        ),
        deadline_ms=deadline_ms,
    )


def _usage(done: bus.Done) -> openai.Usage:
    return openai.Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
        prompt_tokens_details=openai.PromptTokensDetails(cached_tokens=done.cached_tokens),
    )


def _record_done(outcome: Outcome, done: bus.Done) -> None:
    outcome.prompt_tokens = done.prompt_tokens
    outcome.completion_tokens = done.completion_tokens
    outcome.cached_tokens = done.cached_tokens


async def _until_disconnected(request: Request[Any, Any, Any]) -> None:
    """Returns when the client hangs up (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the buyer hangs up first (non-stream requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return await task


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any], runtime: Runtime) -> Response[Any]:
    outcome = Outcome(request_id=request_id_of(request))
    try:
        key = await authenticate(request, runtime.db)
        outcome.key_id = key.key_id
        req = decode_body(await request.body(), openai.ChatCompletionRequest)
        outcome.model, outcome.stream = req.model, req.stream
        call = await runtime.dispatcher.start(_bus_request(req, outcome.request_id, runtime))
    except ApiError as exc:
        # Refused before any generation: still one summary line, with the reason.
        outcome.status = exc.code or "error"
        outcome.log()
        raise
    outcome.provider = call.provider_id
    outcome.prompt_tokens = call.accepted.prompt_tokens
    completion_id = f"chatcmpl-{outcome.request_id}"
    writer = ChunkWriter(completion_id, int(time.time()), req.model)
    headers = {"x-request-id": outcome.request_id}
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return Stream(
            _stream(call, writer, outcome, include_usage=include_usage),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    try:
        completion = await _unless_disconnected(request, _collect(call, writer, outcome))
    except asyncio.CancelledError:
        outcome.status = "client_disconnected"
        outcome.log()
        raise
    return Response(completion, headers=headers)


async def _collect(call: Call, writer: ChunkWriter, outcome: Outcome) -> openai.ChatCompletion:
    parts: list[str] = []
    done: bus.Done | None = None
    try:
        async for frame in call.frames():
            if isinstance(frame, bus.Delta):
                if outcome.ttft_ms is None:
                    outcome.ttft_ms = (time.monotonic() - outcome.started) * 1000
                parts.append(frame.text)
            else:
                done = frame
    except StreamBroken as exc:
        outcome.status = exc.code
        raise ProviderError(f"The provider failed while generating: {exc.message}") from None
    except ApiError as exc:
        outcome.status = exc.code or "error"
        raise
    finally:
        await call.close()
        if done is not None:
            _record_done(outcome, done)
        outcome.log()
    assert done is not None
    return openai.ChatCompletion(
        id=writer.completion_id,
        created=writer.created,
        model=writer.model,
        choices=[
            openai.Choice(
                index=0,
                message=openai.AssistantMessage(content="".join(parts)),
                finish_reason=_FINISH[done.finish_reason],
            )
        ],
        usage=_usage(done),
    )


async def _stream(call: Call, writer: ChunkWriter, outcome: Outcome, *, include_usage: bool) -> AsyncIterator[bytes]:
    try:
        yield writer.role()
        async for frame in call.frames():
            if isinstance(frame, bus.Delta):
                if outcome.ttft_ms is None:
                    outcome.ttft_ms = (time.monotonic() - outcome.started) * 1000
                outcome.completion_tokens += frame.tokens
                if frame.text:
                    yield writer.content(frame.text)
            else:
                _record_done(outcome, frame)
                yield writer.finish(_FINISH[frame.finish_reason])
                if include_usage:
                    yield writer.usage(_usage(frame))
        yield DONE
    except (StreamBroken, ApiError) as exc:
        # Headers are gone already: the error travels in-band, then the stream ends properly.
        code = exc.code or "error"
        outcome.status = code
        yield writer.error(openai.ChunkError(message=f"Generation failed: {exc.message}", type="api_error", code=code))
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        outcome.status = "client_disconnected"
        raise
    finally:
        outcome.log()
        # A disconnect cancels this generator; the cancel message to the provider must still go out.
        closing = asyncio.ensure_future(call.close())
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.shield(closing)
