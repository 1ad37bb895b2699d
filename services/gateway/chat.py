"""POST /v1/chat/completions: authenticate, validate, reserve quota, dispatch over NATS, answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from litestar import Request, Response, post
from litestar.response import Stream

from schemas import bus, openai
from services.auth.bearer import Principal, authenticate
from services.errors import ApiError, ProviderError
from services.gateway.dispatch import Call, StreamBroken
from services.gateway.exchange import Exchange
from services.gateway.requests import decode_body
from services.gateway.sse import DONE, ChunkWriter
from services.ids import request_id_of
from services.runtime import Runtime
from services.usage.metering import Ticket, estimate_prompt_tokens, holder_for

T = TypeVar("T")

_FINISH: dict[str, openai.FinishReason] = {"stop": "stop", "length": "length", "cancelled": "stop"}


def _bus_request(req: openai.ChatCompletionRequest, request_id: str, rt: Runtime) -> bus.InferenceRequest:
    deadline_ms = int((time.time() + rt.settings.request_timeout_s) * 1000)
    return bus.InferenceRequest(
        request_id=request_id,
        model=req.model,
        messages=[bus.BusMessage(role=m.role, content=m.text()) for m in req.messages],
        params=bus.SamplingParams(
            max_tokens=_max_tokens(req, rt),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            stop=req.stop_list(),
        ),
        deadline_ms=deadline_ms,
    )


def _max_tokens(req: openai.ChatCompletionRequest, rt: Runtime) -> int:
    return req.token_limit() or rt.settings.default_max_tokens


def _usage(prompt: int, completion: int, cached: int) -> openai.Usage:
    return openai.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=openai.PromptTokensDetails(cached_tokens=cached),
    )


async def _reserve(runtime: Runtime, principal: Principal, req: openai.ChatCompletionRequest, rid: str) -> Ticket:
    holder, limits = holder_for(principal, runtime.settings)
    tokens = estimate_prompt_tokens([m.text() for m in req.messages]) + _max_tokens(req, runtime)
    return await runtime.metering.reserve(holder, limits, rid, req.model, tokens)


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
    ex = Exchange(request_id=request_id_of(request))
    try:
        principal = await authenticate(request, runtime, allow_demo=True)
        ex.key_id = principal.key_id
        req = decode_body(await request.body(), openai.ChatCompletionRequest)
        ex.model, ex.stream = req.model, req.stream
        ex.ticket = await _reserve(runtime, principal, req, ex.request_id)
        call = await runtime.dispatcher.start(_bus_request(req, ex.request_id, runtime))
    except ApiError as exc:
        # Refused before any generation: nothing was generated, so nothing is billed.
        ex.status, ex.refund = exc.code or "error", True
        await ex.finish(runtime.metering)
        if ex.ticket is not None:
            exc.headers = {**ex.ticket.headers(), **exc.headers}
        raise
    except BaseException:
        ex.status, ex.refund = "internal_error", True
        await ex.finish(runtime.metering)
        raise
    ex.accepted(call.provider_id, call.accepted)
    writer = ChunkWriter(f"chatcmpl-{ex.request_id}", int(time.time()), req.model)
    headers = {"x-request-id": ex.request_id, **ex.ticket.headers()}
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return Stream(
            _stream(call, writer, ex, runtime, include_usage=include_usage),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    try:
        completion = await _unless_disconnected(request, _collect(call, writer, ex))
    except asyncio.CancelledError:
        ex.status = "client_disconnected"
        raise
    except ApiError as exc:
        exc.headers = {**headers, **exc.headers}
        raise
    finally:
        await call.close()
        await ex.finish(runtime.metering)
    return Response(completion, headers=headers)


async def _collect(call: Call, writer: ChunkWriter, ex: Exchange) -> openai.ChatCompletion:
    parts: list[str] = []
    try:
        async for frame in call.frames():
            if isinstance(frame, bus.Delta):
                ex.delta(frame)
                parts.append(frame.text)
                continue
            prompt, completion = ex.done(frame)
            return openai.ChatCompletion(
                id=writer.completion_id,
                created=writer.created,
                model=writer.model,
                choices=[
                    openai.Choice(
                        index=0,
                        message=openai.AssistantMessage(content="".join(parts)),
                        finish_reason=_FINISH[frame.finish_reason],
                    )
                ],
                usage=_usage(prompt, completion, frame.cached_tokens),
            )
    except StreamBroken as exc:
        ex.status = exc.code
        raise ProviderError(f"The provider failed while generating: {exc.message}") from None
    except ApiError as exc:
        ex.status = exc.code or "error"
        raise
    raise ProviderError("The provider's answer ended without a final frame.")


async def _stream(
    call: Call, writer: ChunkWriter, ex: Exchange, runtime: Runtime, *, include_usage: bool
) -> AsyncIterator[bytes]:
    try:
        yield writer.role()
        async for frame in call.frames():
            if isinstance(frame, bus.Delta):
                ex.delta(frame)
                if frame.text:
                    yield writer.content(frame.text)
            else:
                prompt, completion = ex.done(frame)
                yield writer.finish(_FINISH[frame.finish_reason])
                if include_usage:
                    yield writer.usage(_usage(prompt, completion, frame.cached_tokens))
        yield DONE
    except (StreamBroken, ApiError) as exc:
        # Headers are gone already: the error travels in-band, then the stream ends properly.
        ex.status = exc.code or "error"
        error = openai.ChunkError(message=f"Generation failed: {exc.message}", type="api_error", code=ex.status)
        yield writer.error(error)
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        ex.status = "client_disconnected"
        raise
    finally:
        # A disconnect cancels this generator: the provider's cancel and the settlement must still happen.
        closing = asyncio.ensure_future(_close(call, ex, runtime))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(closing)


async def _close(call: Call, ex: Exchange, runtime: Runtime) -> None:
    await call.close()
    await ex.finish(runtime.metering)
