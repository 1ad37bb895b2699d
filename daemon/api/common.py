"""What every route of the daemon's local OpenAI API shares: errors, decoding, the request path.

The local API's one request path (`LocalRequests`): refuse while draining or with no
model, translate with schemas.openai_bus, prepare on the engine (its refusals become
400/503), then run the generation as events, cancelled if the client goes away, and
render them as the gateway does (schemas/openai_render.py, schemas/body.py).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec
import structlog
from litestar import Request, Response
from litestar.response import Stream

from daemon.engine.base import CancelToken, EngineError, Event, Prepared
from schemas import body as wire_body
from schemas import bus, codes, openai, openai_bus
from schemas.disconnect import unless_disconnected
from schemas.errors import ErrorBody, ErrorEnvelope
from schemas.openai_render import ChatRender, CompletionRender

if TYPE_CHECKING:
    from daemon.runtime import Daemon

log = structlog.get_logger("daemon.api")

T = TypeVar("T")
R = TypeVar("R", openai.ChatCompletionRequest, openai.CompletionRequest)
_JSON = msgspec.json.Encoder()
Render = ChatRender | CompletionRender


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str, code: str | None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message=message, type=type, code=code, param=param)


def error_response(exc: ApiError) -> Response[bytes]:
    return Response(_JSON.encode(ErrorEnvelope(error=exc.body)), status_code=exc.status, media_type="application/json")


def engine_error(exc: EngineError) -> ApiError:
    if exc.code == "context_over_budget":
        return ApiError(400, exc.message, type="memory_admission", code=exc.code, param=exc.param)
    if codes.is_request_fault(exc.code):
        return ApiError(400, exc.message, type="invalid_request_error", code=exc.code, param=exc.param)
    if exc.retryable:
        return ApiError(503, exc.message, type="service_unavailable_error", code=exc.code)
    return ApiError(500, exc.message, type="api_error", code=exc.code)


def decode(body: bytes, kind: type[T]) -> T:
    """The body as `kind`, or a 400 naming the field: the gateway's decoder and bounds (schemas/body.py)."""
    try:
        return wire_body.decode(body, kind)
    except wire_body.BodyError as exc:
        raise ApiError(400, exc.message, type="invalid_request_error", code=exc.code, param=exc.param) from None


def streamed(request_id: str, chunks: AsyncIterator[bytes]) -> Stream:
    return Stream(
        chunks, media_type="text/event-stream", headers={"x-request-id": request_id, "cache-control": "no-cache"}
    )


async def collected(request: Request[Any, Any, Any], request_id: str, work: Awaitable[Any]) -> Response[Any]:
    """A non-stream answer; the generation is cancelled if the client hangs up first."""
    return Response(await unless_disconnected(request.receive, work), headers={"x-request-id": request_id})


@dataclass
class LocalRequests:
    daemon: Daemon

    async def prepare(self, build: Callable[[str], bus.InferenceRequest]) -> Prepared:
        if self.daemon.draining:
            raise ApiError(503, "the daemon is shutting down", type="service_unavailable_error", code="draining")
        engine = self.daemon.engine
        model_id = engine.model_id
        if not model_id:
            raise ApiError(503, "No model loaded", type="service_unavailable_error", code="no_model_loaded")
        try:
            return await engine.prepare(build(model_id))
        except EngineError as exc:
            raise engine_error(exc) from None
        except openai_bus.Untranslatable as exc:
            raise ApiError(400, exc.message, type="invalid_request_error", code=exc.code, param=exc.param) from None

    async def serve(
        self,
        request: Request[Any, Any, Any],
        kind: type[R],
        build: Callable[[R, str, str], bus.InferenceRequest],
        render: Callable[[R, str, str], Render],
    ) -> Response[Any]:
        """One OpenAI route: decode the body as `kind`, `build` the engine's request (body, model, request
        id), run it and answer with `render` (body, request id, model) as one body or its events."""
        req = decode(await request.body(), kind)
        request_id = secrets.token_hex(12)
        prepared = await self.prepare(lambda model_id: build(req, model_id, request_id))
        return await self.answer(request, prepared, render(req, request_id, prepared.request.model), stream=req.stream)

    async def answer(
        self, request: Request[Any, Any, Any], prepared: Prepared, render: Render, *, stream: bool
    ) -> Response[Any]:
        """The generation as one OpenAI body or its server-sent events (schemas/openai_render.py)."""
        request_id = prepared.request.request_id
        if stream:
            return streamed(request_id, self._rendered(prepared, render))
        events = self.events(prepared)
        try:
            return await collected(request, request_id, render.collect(events))
        except EngineError as exc:
            raise engine_error(exc) from None
        finally:
            # `collect` returns at Finished: end the generation's bookkeeping (its log line) now.
            await events.aclose()

    async def _rendered(self, prepared: Prepared, render: Render) -> AsyncIterator[bytes]:
        events = self.events(prepared)
        try:
            async with contextlib.aclosing(render.render(events)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except EngineError as exc:
            # Headers are sent already: the error goes in-band, then the stream ends properly.
            for chunk in render.failed(exc.code, f"Generation failed: {exc.message}"):
                yield chunk
        finally:
            await events.aclose()

    async def events(self, prepared: Prepared) -> AsyncGenerator[Event, None]:
        cancel = CancelToken()
        finished: bus.Finished | None = None
        events = cast(AsyncGenerator[Event, None], self.daemon.engine.generate(prepared, cancel))
        try:
            async for event in events:
                if isinstance(event, bus.Finished):
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
