"""The request path every inference surface shares: auth, body, quota, dispatch, answer, settlement.

Chat completions, text completions, Anthropic Messages and OpenAI Responses
differ only in their wire formats. A surface turns its body into a `Job` and
renders the provider's events; everything else happens here, once, so auth,
quotas, metering, cancellation and the summary log line are identical on
every route.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import msgspec
from litestar import Request, Response

from schemas import bus
from schemas.disconnect import unless_disconnected
from schemas.openai_bus import Untranslatable
from services.auth.bearer import authenticate
from services.auth.principal import Principal
from services.errors import ApiError, CoordinatorUnavailable, ProviderError, untranslatable
from services.gateway.answer import JsonAnswer
from services.gateway.dispatch import SHUTTING_DOWN, Call, StreamBroken
from services.gateway.exchange import Exchange
from services.gateway.frames import MAX_JOINED, joined, joins
from services.gateway.requests import read_body
from services.gateway.sse import EventStream, Last
from services.ids import request_id_of
from services.runtime import Runtime
from services.usage.metering import Ticket, estimate_prompt_tokens, holder_for

T = TypeVar("T")
# What a surface decoded its body into (and whatever else it prepared), handed back in `Started.job`.
D = TypeVar("D")


class Job(msgspec.Struct, Generic[D], frozen=True):
    """What a surface asks the pool for (a Struct: made per request, built in C).

    `request` is complete but for its id and deadline, which the pipeline sets.
    """

    request: bus.InferenceRequest
    stream: bool
    # The prompt's texts: the quota reserves an estimate before any provider has counted tokens.
    prompt_texts: list[str]
    # The surface's own view of the request, for rendering the answer.
    decoded: D


Event = bus.Delta | bus.Finished
Prepare = Callable[[Principal, bytes], Awaitable[Job[D]]]


@dataclass
class Started(Generic[D]):
    """A request a provider accepted."""

    principal: Principal
    job: Job[D]
    call: Call
    ex: Exchange
    # x-request-id and the x-ratelimit-* headers, for the answer and for any later error.
    headers: dict[str, str] = field(default_factory=dict)


class Renderer(Protocol):
    """A surface's streaming wire format."""

    def render(self, events: AsyncIterator[Event]) -> AsyncGenerator[bytes, None]: ...

    def failed(self, code: str, message: str) -> list[bytes]:
        """The protocol's in-band error, ending a stream whose headers are already sent."""
        ...


async def _reserve(runtime: Runtime, principal: Principal, job: Job[Any], request_id: str) -> Ticket:
    holder, limits = holder_for(principal, runtime.settings)
    tokens = estimate_prompt_tokens(job.prompt_texts) + job.request.params.max_tokens
    return await runtime.metering.reserve(holder, limits, request_id, job.request.model, tokens, stream=job.stream)


async def start(
    request: Request[Any, Any, Any],
    runtime: Runtime,
    *,
    event: str,
    allow_demo: bool,
    prepare: Prepare[D],
    api_key_header: bool = False,
) -> Started[D]:
    """Authenticate, decode (`prepare`), reserve quota and hand the job to a provider, or raise."""
    request_id = request_id_of(request)
    ex = Exchange(request_id=request_id, event=event, metrics=runtime.metrics, summary=runtime.summary)
    if runtime.tracing is not None:
        # A trace of our own per request: a buyer's traceparent header is not trusted to join one.
        ex.span = runtime.tracing.start(event, attributes={"mp.request_id": request_id, "mp.surface": event})
    try:
        principal = await authenticate(request, runtime, allow_demo=allow_demo, api_key_header=api_key_header)
        ex.key_id = principal.key_id
        body = await read_body(request, runtime.settings.body_timeout_s)
        try:
            job = await prepare(principal, body)
        except Untranslatable as exc:
            raise untranslatable(exc) from None
        ex.model, ex.stream = job.request.model, job.stream
        ex.label(job.request.model, runtime.pool.serves_model)
        ex.ticket = await _reserve(runtime, principal, job, ex.request_id)
        deadline_ms = int((time.time() + runtime.settings.request_timeout_s) * 1000)
        frame_ms = 0 if job.stream else runtime.settings.nonstream_frame_ms
        # Canaries (services/canary/prompts.py) set what a streamed request gets here: keep them alike.
        bus_request = msgspec.structs.replace(
            job.request,
            request_id=ex.request_id,
            deadline_ms=deadline_ms,
            frame_ms=frame_ms,
            bundle=True,
            keepalive_ms=runtime.settings.gateway_keepalive_ms,
        )
        call = await runtime.dispatcher.start(bus_request, parent=ex.span)
        try:
            # The reservation row was written meanwhile (one statement for all requests queued then).
            await runtime.metering.confirm(ex.ticket)
        except BaseException:
            await call.close()
            raise
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
    ex.accepted(call.provider_id, call.accepted, dispatched_at=call.started, accepted_at=call.accepted_at)
    headers = {"x-request-id": ex.request_id, **ex.ticket.headers()}
    return Started(principal, job, call, ex, headers)


async def events(call: Call, ex: Exchange) -> AsyncGenerator[Event, None]:
    """The provider's frames, metered as they pass: deltas, then one `bus.Finished`.

    A streamed answer's deltas that arrived together come out as one (services/gateway/frames.py).
    """
    frames = call.frames()
    # Closed however this ends: a generator left suspended is closed by the loop later, through a
    # thread-safe wake-up and a task of its own (uvloop's finalizer hook), per request.
    try:
        pending: bus.Delta | bus.Done | None = None
        while True:
            frame, pending = pending, None
            if frame is None:
                frame = await anext(frames, None)
                if frame is None:
                    raise ProviderError("The provider's answer ended without a final frame.")
            if isinstance(frame, bus.Done):
                # Bill the provider that finished the answer (the first one may have been lost or cut off).
                ex.provider = call.provider_id
                if ex.ticket is not None:
                    ex.ticket.provider_id = call.provider_id
                prompt, completion = ex.done(frame)
                # The tokens billed replace the provider's claims (never more completion than was seen).
                yield msgspec.structs.replace(
                    frame,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    reasoning_tokens=min(frame.reasoning_tokens, completion),
                )
                return
            ex.delta(frame)
            run = [frame]
            while ex.stream:
                # What arrived already: the Deltas that join the run taken at once (`take_run`), the next
                # run's first kept, anything else through `frames`.
                taken = len(run)
                nxt: bus.Delta | bus.Done | None = call.take_run(run)
                if len(run) > taken:
                    ex.joined_frames(run, taken)
                if nxt is None:
                    if not call.ready():
                        break
                    nxt = await anext(frames, None)
                if not (isinstance(nxt, bus.Delta) and joins(run, nxt)):
                    pending = nxt
                    break
                run.append(nxt)
                ex.joined_frames(run, len(run) - 1)
            if len(run) > 1:
                ex.run_taken()
            yield joined(run)
    finally:
        await frames.aclose()


def _broken(ex: Exchange, call: Call) -> None:
    """The call ended without an answer: record the counts the call still trusts."""
    if ex.ticket is not None:
        ex.ticket.prompt_tokens = call.accepted.prompt_tokens
    # Providers failed the buyer before a single token arrived: nothing of value, nothing billed.
    ex.refund = call.tokens_delivered == 0


async def answer(
    request: Request[Any, Any, Any],
    runtime: Runtime,
    started: Started[Any],
    consume: Callable[[AsyncIterator[Event]], Awaitable[T]],
) -> T:
    """A non-stream answer: `consume` reads the events into the surface's response body."""
    ex, call = started.ex, started.call
    try:
        async with contextlib.aclosing(events(call, ex)) as answered:
            return await unless_disconnected(request.receive, consume(answered), request.scope)
    except asyncio.CancelledError:
        ex.status = "client_disconnected"
        raise
    except StreamBroken as exc:
        ex.status = exc.code
        _broken(ex, call)
        if exc.code == SHUTTING_DOWN:
            raise CoordinatorUnavailable(
                "This replica shut down before the answer was complete; retry and another replica will answer.",
                headers=started.headers,
            ) from None
        raise ProviderError(f"The provider failed while generating: {exc.message}", headers=started.headers) from None
    except ApiError as exc:
        ex.status = exc.code or "error"
        exc.headers = {**started.headers, **exc.headers}
        raise
    finally:
        await call.close()
        await ex.finish(runtime.metering)


async def respond(
    request: Request[Any, Any, Any],
    runtime: Runtime,
    started: Started[Any],
    renderer: Renderer,
    collect: Callable[[AsyncIterator[Event]], Awaitable[Any]],
) -> Response[Any]:
    """The answer as the job asked for it: the surface's server-sent events, or one body `collect` builds."""
    if started.job.stream:
        return stream(runtime, started, renderer)
    return JsonAnswer(await answer(request, runtime, started, collect), started.headers)


def stream(runtime: Runtime, started: Started[Any], renderer: Renderer) -> EventStream:
    """A server-sent-event answer in the surface's format; it always ends properly."""
    return EventStream(
        _guarded(runtime, started, renderer),
        {**started.headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _guarded(runtime: Runtime, started: Started[Any], renderer: Renderer) -> AsyncGenerator[bytes, None]:
    ex, call = started.ex, started.call
    held: list[bytes] = []
    # Some of the answer reached the buyer (its first token has).
    wrote = False
    # The answer went out whole: its end waits for the settlement here, in the request's own task.
    whole = False
    try:
        async with (
            contextlib.aclosing(events(call, ex)) as answered,
            contextlib.aclosing(renderer.render(answered)) as chunks,
        ):
            async for chunk in chunks:
                held.append(chunk)
                # What the renderer makes next without waiting (from a frame already here, or the
                # answer's last chunks once its final frame came) leaves in the same write: the role
                # chunk with the first text, the finish, usage and [DONE] chunks together.
                if not (call.ready() or call.finished) or len(held) >= MAX_JOINED:
                    yield held[0] if len(held) == 1 else b"".join(held)
                    held.clear()
                    wrote = True
        # The answer is whole: its settlement leaves for the usage stream now, in the same loop turn as
        # its last frame. Its last chunks wait for it below, to leave in one write with the response's end.
        settling = ex.finishing(runtime.metering)
        if held and not wrote and settling is not None:
            # All of it came with the final frame: its first token does not wait for the settlement.
            yield b"".join(held)
            held.clear()
        whole = True
    except (StreamBroken, ApiError) as exc:
        # Headers are gone already: the error travels in-band, then the stream ends properly.
        ex.status = exc.code or "error"
        if isinstance(exc, StreamBroken):
            _broken(ex, call)
        yield b"".join([*held, *renderer.failed(ex.status, f"Generation failed: {exc.message}")])
    except (asyncio.CancelledError, GeneratorExit):
        ex.status = "client_disconnected"
        raise
    finally:
        if not whole:
            # A disconnect cancels this generator: the provider's cancel and the settlement must still happen.
            closing = asyncio.ensure_future(_close(call, ex, runtime))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(closing)
    if not whole:
        return
    # Not `_close` in a task of its own behind a shield (a task, and two more loop turns between the
    # acknowledgement and the answer's end): the provider finished, so closing the call has nothing to
    # cancel, and a buyer who leaves now cancels only this wait (the settlement goes on: Metering.settling).
    await call.close()
    if settling is not None:
        with contextlib.suppress(Exception):
            await settling
    if held:
        # The last chunks and the response's end in one write, after the settlement is stored: written
        # before it, the end went alone a few ms later (a second system call, and a second wake-up of the
        # buyer's client), a tenth of requests/s at c=64 with metering on. The end could not go sooner
        # anyway; only the answer's last frame waits, by the settlement's acknowledgement (at most
        # usage.publisher.ACK_TIMEOUT_S, when the usage stream stalls).
        yield Last(b"".join(held))


async def _close(call: Call, ex: Exchange, runtime: Runtime) -> None:
    await call.close()
    await ex.finish(runtime.metering)
