"""What every route of the daemon's local OpenAI API shares: errors, decoding, SSE, the request path.

The local API's one request path (`LocalRequests`): refuse while draining or with no
model, translate with schemas.openai_bus, prepare on the engine (its refusals become
400/503), then run the generation as events, cancelled if the client goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec
import structlog
from litestar import Request, Response
from litestar.response import Stream

from daemon.engine.base import CancelToken, EngineError, Finished, Prepared
from schemas import bus, codes, limits, openai, openai_bus
from schemas import sse as wire_sse
from schemas.errors import ErrorBody, ErrorEnvelope

if TYPE_CHECKING:
    from daemon.runtime import Daemon

log = structlog.get_logger("daemon.api")

T = TypeVar("T")
_JSON = msgspec.json.Encoder()
FINISH = openai_bus.FINISH


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


def _invalid(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", code="invalid_value", param=param)


def decode(body: bytes, kind: type[T]) -> T:
    """The body as `kind`, or a 400 naming the field (the gateway's bounds hold here too: schemas/limits.py)."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        param, detail = limits.explain(exc)
        raise _invalid(f"Invalid value for '{param}': {detail}." if param else f"{detail}.", param) from None
    except limits.LimitExceeded as exc:
        raise _invalid(exc.message, exc.param) from None
    except RecursionError:
        # Nested past what the decoder follows (about a thousand levels): find the field.
        param = limits.deep_field(body, kind)
        at = f"'{param}'" if param else "the request body"
        message = f"Invalid value for {at}: JSON nested more than {limits.MAX_JSON_DEPTH} levels deep."
        raise _invalid(message, param) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"invalid JSON: {exc}", type="invalid_request_error", code="invalid_json") from None


sse = wire_sse.data
DONE = wire_sse.DONE


def usage(f: Finished) -> openai.Usage:
    return openai_bus.usage(f.prompt_tokens, f.completion_tokens, f.cached_tokens, f.reasoning_tokens)


async def until_disconnected(request: Request[Any, Any, Any]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (and so the generation) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return await task


def streamed(request_id: str, chunks: AsyncIterator[bytes]) -> Stream:
    return Stream(
        chunks, media_type="text/event-stream", headers={"x-request-id": request_id, "cache-control": "no-cache"}
    )


async def collected(request: Request[Any, Any, Any], request_id: str, work: Awaitable[Any]) -> Response[Any]:
    """A non-stream answer; the generation is cancelled if the client hangs up first."""
    return Response(await unless_disconnected(request, work), headers={"x-request-id": request_id})


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

    async def events(self, prepared: Prepared) -> AsyncIterator[Any]:
        cancel = CancelToken()
        finished: Finished | None = None
        events = cast(AsyncGenerator[Any, None], self.daemon.engine.generate(prepared, cancel))
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
