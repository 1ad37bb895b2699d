"""The local OpenAI-compatible API (127.0.0.1): the Mac's owner uses the same engine as the pool.

`/health`, `/v1/models`, `/v1/chat/completions`, `/v1/completions`. Requests
run on the engine that serves NATS work, in the same batch. The request's
`model` is not used to pick a model: the loaded one answers and its id is echoed.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec
import structlog
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.response import Stream

from daemon import __version__
from daemon.engine.base import INVALID_REQUEST_CODES, CancelToken, EngineError, Finished, Prepared
from schemas import bus, openai, openai_bus
from schemas.errors import ErrorBody, ErrorEnvelope

if TYPE_CHECKING:
    from daemon.runtime import Daemon

log = structlog.get_logger("daemon.api")

T = TypeVar("T")
_JSON = msgspec.json.Encoder()
_PARAM = re.compile(r"at `\$\.([A-Za-z_][A-Za-z0-9_]*)")
_FINISH = openai_bus.FINISH
# When a local request sets no limit (the gateway has its own default for pool requests).
DEFAULT_CHAT_MAX_TOKENS = 1024
# Seed 001's default for /v1/completions.
DEFAULT_COMPLETION_MAX_TOKENS = 100


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str, code: str | None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message=message, type=type, code=code, param=param)


def _error_response(exc: ApiError) -> Response[bytes]:
    return Response(_JSON.encode(ErrorEnvelope(error=exc.body)), status_code=exc.status, media_type="application/json")


def _engine_error(exc: EngineError) -> ApiError:
    if exc.code == "context_over_budget":
        return ApiError(400, exc.message, type="memory_admission", code=exc.code, param=exc.param)
    if exc.code in INVALID_REQUEST_CODES:
        return ApiError(400, exc.message, type="invalid_request_error", code=exc.code, param=exc.param)
    if exc.retryable:
        return ApiError(503, exc.message, type="service_unavailable_error", code=exc.code)
    return ApiError(500, exc.message, type="api_error", code=exc.code)


def _decode(body: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        m = _PARAM.search(str(exc))
        raise ApiError(
            400, str(exc), type="invalid_request_error", code="invalid_value", param=m.group(1) if m else None
        ) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"invalid JSON: {exc}", type="invalid_request_error", code="invalid_json") from None


def _sse(payload: msgspec.Struct) -> bytes:
    return b"data: " + _JSON.encode(payload) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def _usage(f: Finished) -> openai.Usage:
    return openai_bus.usage(f.prompt_tokens, f.completion_tokens, f.cached_tokens, f.reasoning_tokens)


async def _until_disconnected(request: Request[Any, Any, Any]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (and so the generation) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return await task


def create_api_app(daemon: Daemon) -> Litestar:
    engine = daemon.engine

    def prepare(build: Any) -> Prepared:
        if daemon.draining:
            raise ApiError(503, "the daemon is shutting down", type="service_unavailable_error", code="draining")
        model_id = engine.model_id
        if not model_id:
            raise ApiError(503, "No model loaded", type="service_unavailable_error", code="no_model_loaded")
        try:
            return engine.prepare(build(model_id))
        except EngineError as exc:
            raise _engine_error(exc) from None
        except openai_bus.Untranslatable as exc:
            raise ApiError(400, exc.message, type="invalid_request_error", code=exc.code, param=exc.param) from None

    @get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "healthy", "version": __version__, "model": engine.model_id or None}

    @get("/v1/models")
    async def models() -> openai.ModelList:
        loaded = [engine.model_id] if engine.model_id else []
        return openai.ModelList(data=[openai.Model(id=m, created=0, owned_by="mac-provider-daemon") for m in loaded])

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request[Any, Any, Any]) -> Response[Any]:
        req = _decode(await request.body(), openai.ChatCompletionRequest)
        request_id = secrets.token_hex(12)
        prepared = prepare(
            lambda model_id: openai_bus.chat_request(
                req, default_max_tokens=DEFAULT_CHAT_MAX_TOKENS, model=model_id, request_id=request_id
            )
        )
        created = int(time.time())
        cid = f"chatcmpl-{request_id}"
        model = prepared.request.model
        headers = {"x-request-id": request_id}
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return Stream(
                _chat_stream(prepared, cid, created, model, include_usage=include_usage),
                media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache"},
            )
        completion = await _unless_disconnected(request, _chat_collect(prepared, cid, created, model))
        return Response(completion, headers=headers)

    async def _events(prepared: Prepared) -> AsyncIterator[Any]:
        cancel = CancelToken()
        finished: Finished | None = None
        events = cast(AsyncGenerator[Any, None], engine.generate(prepared, cancel))
        try:
            async for event in events:
                if isinstance(event, Finished):
                    finished = event
                yield event
        finally:
            # The client went away (or the consumer stopped): the engine stops at the next token,
            # and closing its generator takes the request out of the batch now, not at GC time.
            if finished is None:
                cancel.cancel("client_closed")
            await events.aclose()
            log.info(
                "local_request_done",
                request_id=prepared.request.request_id,
                finish=finished.finish_reason if finished else "client_closed",
                prompt_tokens=len(prepared.prompt_tokens),
                completion_tokens=finished.completion_tokens if finished else None,
                cached_tokens=finished.cached_tokens if finished else None,
                ttft_ms=round(finished.ttft_ms, 1) if finished else None,
            )

    async def _chat_collect(prepared: Prepared, cid: str, created: int, model: str) -> openai.ChatCompletion:
        text: list[str] = []
        reasoning: list[str] = []
        calls: list[bus.ToolCall] = []
        logprobs: list[bus.TokenLogprob] = []
        finished: Finished | None = None
        try:
            async for event in _events(prepared):
                if isinstance(event, Finished):
                    finished = event
                else:
                    text.append(event.text)
                    reasoning.append(event.reasoning)
                    calls.extend(event.tool_calls)
                    logprobs.extend(event.logprobs)
        except EngineError as exc:
            raise _engine_error(exc) from None
        assert finished is not None
        message = openai.AssistantMessage(
            content="".join(text),
            tool_calls=openai_bus.tool_calls(calls) if calls else None,
            reasoning_content="".join(reasoning) or msgspec.UNSET,
        )
        choice = openai.Choice(
            index=0,
            message=message,
            finish_reason=_FINISH[finished.finish_reason],
            logprobs=openai.ChoiceLogprobs(content=openai_bus.token_logprobs(logprobs))
            if prepared.request.params.logprobs
            else None,
        )
        return openai.ChatCompletion(id=cid, created=created, model=model, choices=[choice], usage=_usage(finished))

    async def _chat_stream(
        prepared: Prepared, cid: str, created: int, model: str, *, include_usage: bool
    ) -> AsyncIterator[bytes]:
        def chunk(delta: openai.Delta, finish: openai.FinishReason | None = None, **extra: Any) -> bytes:
            return _sse(
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
            async for event in _events(prepared):
                if isinstance(event, Finished):
                    yield chunk(openai.Delta(), _FINISH[event.finish_reason])
                    if include_usage:
                        yield _sse(
                            openai.ChatCompletionChunk(
                                id=cid,
                                object="chat.completion.chunk",
                                created=created,
                                model=model,
                                choices=[],
                                usage=_usage(event),
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
            yield _sse(
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

    @post("/v1/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
        req = _decode(await request.body(), openai.CompletionRequest)
        request_id = secrets.token_hex(12)
        prepared = prepare(
            lambda model_id: openai_bus.completion_request(
                req, default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS, model=model_id, request_id=request_id
            )
        )
        created = int(time.time())
        cid = f"cmpl-{request_id}"
        model = prepared.request.model
        headers = {"x-request-id": request_id}
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return Stream(
                _completion_stream(prepared, cid, created, model, include_usage=include_usage, echo=req.echo),
                media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache"},
            )
        collect = _completion_collect(prepared, cid, created, model, echo=req.echo)
        completion = await _unless_disconnected(request, collect)
        return Response(completion, headers=headers)

    def _completion_logprobs(items: list[bus.TokenLogprob], offset: int) -> openai.CompletionLogprobs:
        offsets = []
        for t in items:
            offsets.append(offset)
            offset += len(t.token)
        return openai.CompletionLogprobs(
            tokens=[t.token for t in items],
            token_logprobs=[t.logprob for t in items],
            top_logprobs=[{a: lp for a, lp, _ in t.top} for t in items] if any(t.top for t in items) else None,
            text_offset=offsets,
        )

    async def _completion_collect(
        prepared: Prepared, cid: str, created: int, model: str, *, echo: bool
    ) -> openai.Completion:
        # echo: the prompt comes back before the completion (refused with logprobs: openai_bus).
        text: list[str] = [prepared.request.prompt or ""] if echo else []
        logprobs: list[bus.TokenLogprob] = []
        finished: Finished | None = None
        try:
            async for event in _events(prepared):
                if isinstance(event, Finished):
                    finished = event
                else:
                    text.append(event.text)
                    logprobs.extend(event.logprobs)
        except EngineError as exc:
            raise _engine_error(exc) from None
        assert finished is not None
        choice = openai.CompletionChoice(
            index=0,
            text="".join(text),
            finish_reason=_FINISH[finished.finish_reason],
            logprobs=_completion_logprobs(logprobs, 0) if prepared.request.params.logprobs else None,
        )
        return openai.Completion(
            id=cid, object="text_completion", created=created, model=model, choices=[choice], usage=_usage(finished)
        )

    async def _completion_stream(
        prepared: Prepared, cid: str, created: int, model: str, *, include_usage: bool, echo: bool
    ) -> AsyncIterator[bytes]:
        def chunk(text: str, finish: openai.FinishReason | None = None, **extra: Any) -> bytes:
            choice = openai.CompletionChoice(index=0, text=text, finish_reason=finish, **extra)
            return _sse(
                openai.Completion(id=cid, object="text_completion", created=created, model=model, choices=[choice])
            )

        offset = 0
        if echo and prepared.request.prompt:
            yield chunk(prepared.request.prompt)
        try:
            async for event in _events(prepared):
                if isinstance(event, Finished):
                    yield chunk("", _FINISH[event.finish_reason])
                    if include_usage:
                        yield _sse(
                            openai.Completion(
                                id=cid,
                                object="text_completion",
                                created=created,
                                model=model,
                                choices=[],
                                usage=_usage(event),
                            )
                        )
                    continue
                if event.text or event.logprobs:
                    lp = (
                        _completion_logprobs(list(event.logprobs), offset) if prepared.request.params.logprobs else None
                    )
                    offset += len(event.text)
                    yield chunk(event.text, logprobs=lp)
            yield DONE
        except EngineError as exc:
            err = openai.ChunkError(message=f"Generation failed: {exc.message}", type="api_error", code=exc.code)
            yield b"data: " + _JSON.encode({"error": err}) + b"\n\n"
            yield DONE

    def on_api_error(request: Request[Any, Any, Any], exc: ApiError) -> Response[bytes]:
        return _error_response(exc)

    def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        return _error_response(ApiError(exc.status_code, str(exc.detail), type="invalid_request_error", code=code))

    return Litestar(
        route_handlers=[health, models, chat, completions],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error},
        openapi_config=None,
        logging_config=None,
    )
