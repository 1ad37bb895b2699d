"""Handing a request to a provider over NATS, and keeping it alive if the provider is lost.

`Dispatcher.start` sends the request to the best candidate that accepts it
(or raises at once). The returned `Call` yields the answer's frames; if its
provider dies, goes silent, misbehaves or fails mid-answer, the call
continues on another provider from the prompt plus the tokens already
generated (`bus.Continuation`), so the buyer sees one uninterrupted answer.
When no provider can continue, the call ends with `StreamBroken`.

Providers are untrusted (services/gateway/vetting.py): every frame is checked
before it is passed on, the buyer is billed for the token ids received, a
provider that breaks the protocol loses the request (and has it recorded
against it), and a provider's refusal of the request itself is tried once more
elsewhere before the buyer hears of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import structlog
from nats.aio.client import Client as Nats
from nats.errors import Error as NatsError
from opentelemetry.trace import Span, StatusCode

from schemas import bus, codes, nats_direct, subjects
from schemas.codes import StreamEnd
from schemas.conversations import conversation_key
from schemas.tracing import Tracing, headers_for
from services.errors import (
    ApiError,
    CoordinatorUnavailable,
    InvalidRequest,
    ProviderError,
    RequestTimeout,
    UnsupportedValue,
)
from services.gateway import vetting
from services.gateway.frames import joins
from services.gateway.json_check import Busy, JsonAnswer, JsonChecks, TooComplex
from services.gateway.pool import PoolView
from services.gateway.replies import ReplyRouter, ReplyStream, StreamBroken, lost_notifier
from services.providers.violations import Violations

if TYPE_CHECKING:
    from services.metrics.registry import Metrics

__all__ = ["SHUTTING_DOWN", "Call", "Dispatcher", "ReplyRouter", "StreamBroken"]

log = structlog.get_logger("gateway.dispatch")

# The code a call ends with when its replica's shutdown grace ran out (`Dispatcher.cut`).
SHUTTING_DOWN: StreamEnd = "shutting_down"

# How often a waiting request re-checks its provider's heartbeat and its deadlines.
_TICK_S = 0.25


def _refusal(frame: bus.Failed) -> ApiError:
    """A provider refused the request itself (bad field, too long): the buyer's error, not ours.

    Only a known code becomes the buyer's error; anything else a provider says is its own failure.
    """
    if codes.is_request_fault(frame.code):
        error: ApiError = InvalidRequest(frame.message, param=frame.param)
        error.code = frame.code
        return error
    return ProviderError(f"The provider refused the request ({frame.code}).")


def _vocab_size(hb: bus.Heartbeat, model: str) -> int:
    return next((m.vocab_size for m in hb.models if m.id == model), 0)


def _conversation_of(request: bus.InferenceRequest) -> str | None:
    """The key of the conversation this request continues (all but its last message)."""
    if request.prompt is not None or len(request.messages) < 2:
        return None
    return conversation_key((m.role, m.content) for m in request.messages[:-1])


@dataclass
class _Leg:
    """One provider's part of a call."""

    provider_id: str
    stream: ReplyStream
    watch: int
    epoch: int
    accepted: bus.Accepted
    check: vetting.LegCheck
    sent_at: float
    first_token_at: float | None = None
    # The `dispatch` span of this provider's part (None: traces are off); ends when the leg is released.
    span: Span | None = None


@dataclass
class Call:
    """A request a provider has accepted; iterate `frames()` for Delta and a final Done."""

    request: bus.InferenceRequest
    accepted: bus.Accepted
    # When the dispatcher was handed the request, and when a provider accepted it (time.monotonic).
    started: float
    _dispatcher: Dispatcher
    _leg: _Leg
    providers: list[str] = field(default_factory=list)
    accepted_at: float = 0.0
    finished: bool = False
    _closed: bool = False
    # What earlier legs delivered, for a continuation and for usage.
    _text: list[str] = field(default_factory=list)
    _reasoning: list[str] = field(default_factory=list)
    _token_ids: list[int] = field(default_factory=list)
    _tokens: int = 0
    _got_first_token: bool = False
    # The buyer request's span: every leg's `dispatch` span is its child.
    _parent: Span | None = None
    # The gateway's time limit for the whole request (time.monotonic), checked at every frame.
    _deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self._deadline = self.started + self._dispatcher.request_timeout_s

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def provider_id(self) -> str:
        return self._leg.provider_id

    @property
    def failovers(self) -> int:
        return len(self.providers) - 1

    @property
    def tokens_delivered(self) -> int:
        return self._tokens

    def ready(self) -> bool:
        """The next frame already arrived (the gateway is behind this stream)."""
        return self._leg.stream.ready()

    def take_run(self, run: list[bus.Delta]) -> bus.Delta | None:
        """Take every Delta that arrived already, checked and counted as `frames()` does, appending each
        to `run` while it joins it (services/gateway/frames.py). Returns a
        frame it took that does not join (the next run's first), or None where `frames()` must take what
        is next: nothing yet, the final frame, a failure, a frame out of sequence or one that breaks the
        protocol (it fails over there), a JSON-constrained answer (its checker's state moves as it
        checks), a replica stopping, the time limit.

        One call per run, not a few per frame: a stream's frames mostly come several at a time (a daemon's
        bundle, or queued while the gateway was busy), and every token of a pool's batched decode steps is
        a frame. (Each through `frames()` would be three coroutine steps.)
        """
        leg = self._leg
        # The time limit read once per run: a run takes what is queued already, without waiting.
        if self._dispatcher.cutting or leg.check.json is not None or time.monotonic() >= self._deadline:
            return None
        stream, check = leg.stream, leg.check.delta
        text, token_ids = self._text, self._token_ids
        while True:
            frame = stream.take_delta()
            if frame is None:
                return None
            try:
                check(frame)
            except vetting.Violation:
                stream.untake(frame)
                return None  # `frames()` meets it again, and fails over
            ids = frame.token_ids
            if leg.first_token_at is None and ids:
                leg.first_token_at = time.monotonic()
            # `_delivered`, inline: every frame of a busy stream comes this way.
            self._got_first_token = True
            text.append(frame.text)
            if frame.reasoning:
                self._reasoning.append(frame.reasoning)
            token_ids += ids
            self._tokens += len(ids)
            if not joins(run, frame):
                return frame
            run.append(frame)

    def _delivered(self, frame: bus.Delta) -> None:
        self._got_first_token = True
        self._text.append(frame.text)
        if frame.reasoning:  # joined in order, so leaving out the empty ones changes nothing
            self._reasoning.append(frame.reasoning)
        self._token_ids.extend(frame.token_ids)
        # Billed from the ids received (vetting checked the declared count agrees).
        self._tokens += len(frame.token_ids)

    async def frames(self) -> AsyncGenerator[bus.Delta | bus.Done, None]:
        while True:
            try:
                frame = self._checked(await self._next())
            except StreamBroken as exc:
                if not exc.recoverable:
                    raise
                await self._fail_over(exc)
                continue
            if isinstance(frame, bus.Delta):
                self._delivered(frame)
                yield frame
                continue
            self.finished = True
            self._dispatcher.measure_end(self._leg)
            # Bill the original prompt once and every token delivered, across providers.
            yield msgspec.structs.replace(
                frame,
                prompt_tokens=self.accepted.prompt_tokens,
                completion_tokens=self._tokens,
                cached_tokens=min(frame.cached_tokens, self.accepted.prompt_tokens),
            )
            return

    def _checked(self, frame: bus.Delta | bus.Done) -> bus.Delta | bus.Done:
        """The frame if the provider kept the protocol; a violation ends its part (StreamBroken)."""
        leg = self._leg
        try:
            if isinstance(frame, bus.Delta):
                leg.check.delta(frame)
                if leg.first_token_at is None and frame.token_ids:
                    leg.first_token_at = time.monotonic()
                return frame
            return leg.check.done(frame)
        except vetting.Violation as v:
            raise StreamBroken("provider_protocol_error", v.detail, recoverable=True, violation=v.kind) from None
        finally:
            for problem in leg.check.problems:
                self._dispatcher.violation(leg.provider_id, problem.kind, problem.detail, self.request_id)
            leg.check.problems.clear()

    async def _next(self) -> bus.Delta | bus.Done:
        d = self._dispatcher
        deadline = self.started + d.request_timeout_s
        last_frame = time.monotonic()
        while True:
            if d.cutting:
                # This replica is stopping and its grace ran out (services/lifecycle.py): end in-band, now.
                raise StreamBroken(SHUTTING_DOWN, "this gateway replica is shutting down")
            now = time.monotonic()
            if now >= deadline:
                raise RequestTimeout(f"The request exceeded the gateway's time limit of {d.request_timeout_s:g} s.")
            frame = await self._leg.stream.next(min(_TICK_S, deadline - now))
            now = time.monotonic()
            if frame is not None:
                if isinstance(frame, bus.Failed):
                    raise StreamBroken(frame.code, frame.message, recoverable=codes.is_recoverable(frame.code))
                if isinstance(frame, bus.Accepted):
                    raise StreamBroken("provider_protocol_error", "second accepted frame", recoverable=True)
                return frame
            pid = self.provider_id
            if d.pool.silent(pid, d.lost_after_intervals):
                # A sleeping Mac or a cut network: its heartbeats stopped too.
                raise StreamBroken("provider_lost", f"provider {pid} stopped sending heartbeats", recoverable=True)
            if not self._got_first_token and now - self.started > d.first_token_timeout_s:
                raise StreamBroken(
                    "first_token_timeout",
                    f"no first token from {pid} within {d.first_token_timeout_s:g} s",
                    recoverable=True,
                )
            if now - last_frame > d.stream_idle_timeout_s:
                raise StreamBroken("provider_timeout", f"provider {pid} went silent", recoverable=True)

    async def _fail_over(self, cause: StreamBroken) -> None:
        d = self._dispatcher
        lost = self.provider_id
        if self._leg.span is not None:
            self._leg.span.set_status(StatusCode.ERROR, cause.code[:64])
        d.pool.note_failure(lost)
        if cause.violation is not None:
            d.violation(lost, cause.violation, cause.message, self.request_id)
            # It lied about something: none of its counts are trusted, its prompt count included.
            self.accepted = msgspec.structs.replace(self.accepted, prompt_tokens=0)
        await self._release_leg(cancel=True)
        if self.failovers >= d.max_failovers:
            self.finished = True
            raise StreamBroken(cause.code, cause.message)
        continued = msgspec.structs.replace(
            self.request,
            continuation=bus.Continuation(
                token_ids=list(self._token_ids), text="".join(self._text), reasoning="".join(self._reasoning)
            ),
        )
        try:
            self._leg = await d.open_leg(
                continued, exclude=set(self.providers), json=self._leg.check.json, parent=self._parent
            )
        except ApiError as exc:
            self.finished = True
            raise StreamBroken(
                cause.code, f"{cause.message}; no other provider could continue ({exc.message})"
            ) from None
        self.providers.append(self.provider_id)
        if cause.violation is not None:
            # The new provider counted the prompt plus the continuation's tokens.
            prompt = max(0, self._leg.accepted.prompt_tokens - len(self._token_ids))
            self.accepted = msgspec.structs.replace(self.accepted, prompt_tokens=prompt)
        if d.metrics is not None:
            d.metrics.failovers.labels(d.metrics.codes(cause.code)).inc()
        log.warning(
            "failover",
            request_id=self.request_id,
            lost=lost,
            to=self.provider_id,
            reason=cause.code,
            tokens_so_far=self._tokens,
        )

    async def _release_leg(self, *, cancel: bool) -> None:
        leg = self._leg
        self._dispatcher.release_leg(self.request_id, leg)
        if cancel:
            await self._dispatcher.cancel(leg.provider_id, self.request_id)

    async def close(self) -> None:
        """Release the request; if it did not finish, tell the provider to stop generating. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._release_leg(cancel=not self.finished)


class Dispatcher:
    def __init__(
        self,
        nc: Nats,
        pool: PoolView,
        router: ReplyRouter,
        gateway_id: str,
        *,
        accept_timeout_s: float,
        stream_idle_timeout_s: float,
        request_timeout_s: float,
        first_token_timeout_s: float = 60.0,
        lost_after_intervals: float = 2.0,
        max_failovers: int = 2,
        max_attempts: int = 3,
        violations: Violations | None = None,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._nc = nc
        self.pool = pool
        self._router = router
        self._gateway_id = gateway_id
        self.accept_timeout_s = accept_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self.lost_after_intervals = lost_after_intervals
        self.max_failovers = max_failovers
        self.max_attempts = max_attempts
        self._violations = violations
        self.metrics = metrics
        self._tracing = tracing
        self._json = JsonChecks()
        # Cancels sent on behalf of cancelled tasks (held so they are not collected mid-flight).
        self._background: set[asyncio.Future[None]] = set()
        # Set by `cut`: every running call ends within one tick.
        self.cutting = False

    def cut(self) -> None:
        """End every running call (with StreamBroken `shutting_down`): the replica's shutdown grace ran out."""
        self.cutting = True

    def violation(self, provider_id: str, kind: str, detail: str, request_id: str | None = None) -> None:
        if self._violations is not None:
            self._violations.record(provider_id, kind, detail, request_id)

    async def start(self, request: bus.InferenceRequest, *, parent: Span | None = None) -> Call:
        """Hand the request to the best provider that accepts it, or raise at once.

        `parent`: the buyer request's span; each provider's part is a `dispatch` span under it.
        """
        started = time.monotonic()
        json = None
        fmt = request.params.response_format
        if fmt is not None:
            param = "response_format.json_schema.schema" if fmt.type == "json_schema" else "response_format"
            try:
                json = await self._json.answer(fmt)
            except Busy as exc:
                raise CoordinatorUnavailable(f"The gateway cannot check JSON answers right now: {exc}.") from None
            except TooComplex as exc:
                error = InvalidRequest(f"The JSON schema is too complex to enforce: {exc}.", param=param)
                error.code = "request_too_complex"
                raise error from None
            except (ValueError, TypeError) as exc:
                raise InvalidRequest(f"The JSON schema is not usable: {str(exc)[:400]}", param=param) from None
        leg = await self.open_leg(request, exclude=set(), json=json, parent=parent)
        accepted_at = time.monotonic()
        return Call(
            request,
            leg.accepted,
            started,
            self,
            leg,
            providers=[leg.provider_id],
            accepted_at=accepted_at,
            _parent=parent,
        )

    def measure_end(self, leg: _Leg) -> None:
        """A leg ended properly: what it showed of the provider's speed."""
        now = time.monotonic()
        if leg.first_token_at is not None:
            self.pool.note_first_token(leg.provider_id, leg.first_token_at - leg.sent_at)
            self.pool.note_decoding(leg.provider_id, leg.check.tokens - 1, now - leg.first_token_at)

    async def open_leg(
        self,
        request: bus.InferenceRequest,
        *,
        exclude: set[str],
        json: JsonAnswer | None = None,
        parent: Span | None = None,
    ) -> _Leg:
        span = None
        if self._tracing is not None and parent is not None:
            span = self._tracing.start(
                "dispatch",
                parent=parent,
                attributes={"mp.request_id": request.request_id, "mp.continuation": request.continuation is not None},
            )
        try:
            leg = await self._open_leg(request, exclude=exclude, json=json, span=span)
        except BaseException as exc:
            if span is not None:
                span.set_status(StatusCode.ERROR, getattr(exc, "code", None) or type(exc).__name__)
                span.end()
            raise
        leg.span = span
        return leg

    async def _open_leg(
        self, request: bus.InferenceRequest, *, exclude: set[str], json: JsonAnswer | None, span: Span | None
    ) -> _Leg:
        key = _conversation_of(request)
        structured = request.params.response_format is not None
        tools = vetting.offered_tools(request)
        continued = max(request.continuation.token_ids, default=-1) if request.continuation else -1
        candidates = [
            s
            for s in self.pool.candidates(request.model, key, structured=structured)
            if s.provider_id not in exclude and continued < (_vocab_size(s.heartbeat, request.model) or bus.MAX_COUNT)
        ]
        if not candidates:
            if structured and request.model in self.pool.models() and not self.pool.can_structure(request.model):
                raise UnsupportedValue(
                    f"No provider serving {request.model!r} can constrain its output to JSON right now: "
                    "send the request without a JSON format and ask for JSON in the prompt.",
                    param="response_format",
                )
            served = sorted(self.pool.models())
            hint = f" Models served now: {', '.join(served)}." if served else " No provider is connected."
            raise CoordinatorUnavailable(f"No provider can serve model {request.model!r} right now.{hint}")
        payload = bus.encode(request)
        # The trace context rides in the work message's headers (W3C traceparent): the daemon's spans join it.
        headers = headers_for(span)
        max_frames, max_bytes = vetting.frame_budget(request)
        last_error = ""
        refused: bus.Failed | None = None
        for state in candidates[: self.max_attempts]:
            pid = state.provider_id
            stream = self._router.open(request.request_id, pid, max_frames=max_frames, max_bytes=max_bytes)
            watch = self.pool.watch(pid, lost_notifier(stream))
            epoch = self.pool.note_sent(pid)
            sent_at = time.monotonic()
            if span is not None:
                span.set_attribute("mp.provider", pid)
            try:
                work, reply = subjects.work(pid), stream.subject
                # Queued without nats-py's coroutine chain where it can be (no trace headers): the same write.
                if headers or not nats_direct.publish_nowait(self._nc, work, payload, reply):
                    await self._nc.publish(work, payload, reply=reply, headers=headers)
                check = vetting.LegCheck(request, _vocab_size(state.heartbeat, request.model), tools, json)
                frame = await stream.next(self.accept_timeout_s)
                if isinstance(frame, bus.Accepted):
                    check.accepted(frame)
                    return _Leg(pid, stream, watch, epoch, frame, check, sent_at)
                if frame is None:
                    self.pool.note_failure(pid)
            except StreamBroken as exc:
                self.pool.note_failure(pid)
                if exc.violation is not None:
                    self.violation(pid, exc.violation, exc.message, request.request_id)
                frame = bus.Failed(seq=0, code=exc.code, message=exc.message, retryable=True)
            except vetting.Violation as v:
                self.pool.note_failure(pid)
                self.violation(pid, v.kind, v.detail, request.request_id)
                frame = bus.Failed(seq=0, code="provider_protocol_error", message=v.detail, retryable=True)
            except BaseException as exc:
                # Cancelled (the buyer's task, a replica shutting down) or the publish failed: the leg
                # must not outlive its request, or the provider's load here and its reply stream leak
                # for good, and a provider that got the work must hear it is not wanted.
                self._router.close(stream)
                self.pool.unwatch(pid, watch)
                self.pool.note_finished(pid, epoch)
                self._cancel_soon(pid, request.request_id)
                if isinstance(exc, NatsError):
                    # Our own NATS connection is closed or its outbound buffer full (a long outage).
                    raise CoordinatorUnavailable(
                        f"The gateway cannot reach the provider network right now ({type(exc).__name__})."
                    ) from None
                raise
            self._router.close(stream)
            self.pool.unwatch(pid, watch)
            self.pool.note_finished(pid, epoch)
            # Nothing ran there; make sure a late acceptance is cancelled, then try the next one.
            await self.cancel(pid, request.request_id)
            if isinstance(frame, bus.Failed) and not frame.retryable:
                if refused is not None:
                    raise _refusal(frame)
                # The request itself was refused: one other provider gets to say so too before the
                # buyer hears it, so one provider (broken or lying) cannot fail requests alone.
                refused = frame
            last_error = frame.message if isinstance(frame, bus.Failed) else f"no answer in {self.accept_timeout_s:g} s"
            log.warning("provider_declined", provider=pid, request_id=request.request_id, reason=last_error[:200])
            if self.metrics is not None:
                self.metrics.declines.inc()
        if refused is not None:
            raise _refusal(refused)
        raise CoordinatorUnavailable(f"No provider accepted the request for {request.model!r} ({last_error[:200]}).")

    def release_leg(self, request_id: str, leg: _Leg) -> None:
        if leg.span is not None:
            leg.span.end()
            leg.span = None
        self._router.close(leg.stream)
        self.pool.unwatch(leg.provider_id, leg.watch)
        self.pool.note_finished(leg.provider_id, leg.epoch)

    async def cancel(self, provider_id: str, request_id: str) -> None:
        with contextlib.suppress(Exception):
            await self._nc.publish(subjects.cancel(provider_id), bus.encode(bus.Cancel(request_id=request_id)))

    def _cancel_soon(self, provider_id: str, request_id: str) -> None:
        """`cancel` from a task being cancelled: its own task, which the caller's cancellation cannot stop."""
        task = asyncio.ensure_future(self.cancel(provider_id, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
