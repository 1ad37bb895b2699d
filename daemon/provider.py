"""The daemon on the bus: takes work for this provider, streams frames back, heartbeats.

Frames for one request are numbered from 0 and always end with Done or Failed,
so the gateway can tell a finished answer from a provider that vanished.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import nats
import structlog
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from opentelemetry.trace import Span, SpanContext, StatusCode

from daemon import __version__
from daemon.engine.base import CancelToken, Engine, EngineError
from daemon.frames import coalesced
from daemon.gateways import UNWANTED_AFTER, GatewayWatch
from daemon.machine import available_bytes
from daemon.metrics import DaemonMetrics
from daemon.outbox import Outbox, at_once
from daemon.settings import DaemonSettings
from schemas import bus, nats_direct, subjects
from schemas.codes import FailCode
from schemas.conversations import conversation_key
from schemas.tasks import cancel_and_wait
from schemas.tracing import Tracing, parent_context, remote_parent

log = structlog.get_logger("daemon")

# How many conversation keys a heartbeat carries (16 hex characters each).
CACHED_CONVERSATIONS = 64

_REQUEST = bus.decoder(bus.InferenceRequest)
_CANCEL = bus.decoder(bus.Cancel)
_NOTICE: msgspec.msgpack.Decoder[bus.PoolNotice | bus.GatewayAlive] = msgspec.msgpack.Decoder(
    bus.PoolNotice | bus.GatewayAlive
)
# How often running requests are checked for a gateway gone silent (daemon/gateways.py).
GATEWAY_CHECK_S = 0.25
# The cancel reason of a request whose gateway fell silent.
GATEWAY_LOST = "gateway_lost"


@dataclass
class _InFlight:
    cancel: CancelToken
    task: asyncio.Task[None]
    # The gateway replica that sent it, and how often it promised to say it is still there (0: never).
    gateway_id: str = ""
    keepalive_s: float = 0.0
    # Its gateway's notices in a row that left it out (`GatewayAlive.request_ids`).
    left_out: int = 0


# How long a request's Accepted frame may wait for its first token to go with it (bundles only). A fast
# first token then reaches the gateway in the same message: one wake-up of the gateway and one message
# through nats-server instead of two, on every request's path to its first token. A real model's prompt
# takes longer than this, and its Accepted goes alone, this much later (the gateway waits seconds for it).
ACCEPT_HOLD_S = 0.001


@dataclass
class _Replier:
    nc: Nats
    subject: str
    seq: int = 0
    # Set when the gateway takes bundles (daemon/outbox.py): (the outbox, its bundle subject, request id).
    bundled: tuple[Outbox, str, str] | None = None
    # The Accepted frame held for the first token (`accept`), and its timer.
    held: bytes | None = None
    holding: asyncio.TimerHandle | None = None
    # A held frame the timer could not queue without a coroutine: sent by this task, awaited before more.
    releasing: asyncio.Task[None] | None = None

    def bundle_via(self, outbox: Outbox) -> None:
        provider_id, gateway_id, request_id = subjects.parse_reply(self.subject)
        self.bundled = (outbox, subjects.bundle(provider_id, gateway_id), request_id)

    def _frame(self, make: type[bus.Frame], **fields: object) -> bytes:
        if make is bus.Failed:
            # The wire type bounds a message's length: a longer one would not even decode at the gateway.
            fields["message"] = str(fields["message"])[: bus.MAX_MESSAGE_CHARS]
        frame = make(seq=self.seq, **fields)  # type: ignore[arg-type]
        self.seq += 1
        return bus.encode(frame)

    async def accept(self, prompt_tokens: int, queue_position: int) -> None:
        """The Accepted frame: with bundles, held up to ACCEPT_HOLD_S for the next frame to go with it."""
        data = self._frame(bus.Accepted, prompt_tokens=prompt_tokens, queue_position=queue_position)
        if self.bundled is None:
            await self._publish((data,))
            return
        self.held = data
        self.holding = asyncio.get_running_loop().call_later(ACCEPT_HOLD_S, self._release)

    def _release(self) -> None:
        """The hold is over and no frame came: the Accepted goes alone."""
        held, self.held, self.holding = self.held, None, None
        if held is not None and not self._publish_nowait((held,)):
            self.releasing = asyncio.ensure_future(self._publish_quietly((held,)))

    async def send(self, make: type[bus.Frame], **fields: object) -> None:
        """One frame (after a held Accepted, in the same message): queued without a coroutine where it can
        be (nats_direct), to leave with what else this loop turn sends."""
        if self.releasing is not None:
            await self.releasing  # the Accepted first
            self.releasing = None
        data = self._frame(make, **fields)
        frames: tuple[bytes, ...] = (data,)
        if self.held is not None:
            assert self.holding is not None
            self.holding.cancel()
            frames, self.held, self.holding = (self.held, data), None, None
        await self._publish(frames)

    def _message(self, frames: tuple[bytes, ...]) -> tuple[str, bytes]:
        """Frames sent at once as one message (several only with bundles: nothing is held without)."""
        if self.bundled is None:
            (frame,) = frames
            return self.subject, frame
        _, bundle_subject, request_id = self.bundled
        return at_once(bundle_subject, self.subject, request_id, frames)

    def _publish_nowait(self, frames: tuple[bytes, ...]) -> bool:
        if self.bundled is not None:
            outbox, bundle_subject, request_id = self.bundled
            if outbox.put_all(bundle_subject, self.subject, request_id, frames):
                return True
        return nats_direct.publish_nowait(self.nc, *self._message(frames))

    async def _publish(self, frames: tuple[bytes, ...]) -> None:
        if not self._publish_nowait(frames):
            await self.nc.publish(*self._message(frames))

    async def _publish_quietly(self, frames: tuple[bytes, ...]) -> None:
        # From the timer: a connection closed meanwhile (the daemon stopping) loses the frame, as the
        # outbox loses what it cannot send; the gateway fails the request over or out.
        with contextlib.suppress(Exception):
            await self.nc.publish(*self._message(frames))

    async def done(self, finished: bus.Finished) -> None:
        """The `Done` frame: the engine's `Finished` as is, its timings rounded."""
        timings = {t: round(getattr(finished, t), 2) for t in ("queue_ms", "ttft_ms", "generation_ms")}
        await self.send(bus.Done, **{**msgspec.structs.asdict(finished), **timings})

    async def fail(self, code: FailCode, message: str, *, retryable: bool = False, param: str | None = None) -> None:
        """A `Failed` frame; the code is typed here, as `send`'s fields are not."""
        await self.send(bus.Failed, code=code, message=message, retryable=retryable, param=param)


@dataclass
class _Every:
    """A reading refreshed at most every `seconds` (heartbeats come every second)."""

    seconds: float
    read: Callable[[], int]
    _value: int = 0
    _at: float = float("-inf")

    def get(self) -> int:
        now = time.monotonic()
        if now - self._at >= self.seconds:
            self._value, self._at = self.read(), now
        return self._value


@dataclass
class Provider:
    settings: DaemonSettings
    engine: Engine
    # Counted as each request ends (daemon/metrics.py); traces (None: off; schemas/tracing.py).
    metrics: DaemonMetrics = field(default_factory=DaemonMetrics)
    tracing: Tracing | None = None
    boot_id: str = field(default_factory=lambda: secrets.token_hex(6))
    draining: bool = False
    _nc: Nats | None = None
    _inflight: dict[str, _InFlight] = field(default_factory=dict)
    _operator_drain: asyncio.Task[None] | None = None
    # Tasks nothing else holds (an undecodable request's answer): kept here until done.
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    served: int = 0
    # Recent conversations the worker's prompt cache holds (newest last), for cache-aware routing.
    _conversations: deque[str] = field(default_factory=lambda: deque(maxlen=CACHED_CONVERSATIONS))
    _memory: _Every = field(default_factory=lambda: _Every(5.0, available_bytes))
    _nats_errors: dict[str, float] = field(default_factory=dict)
    # Said once: the pool refused our credentials (see _refused).
    _refused_logged: bool = False
    # How the pool last said it sees our models (routed or why not), and when (unix seconds).
    pool_notice: bus.PoolNotice | None = None
    pool_notice_at: float = 0.0
    # Frames for gateways that take bundles (made once connected).
    _outbox: Outbox | None = None
    # When each gateway with requests here last said it is still there.
    _gateways: GatewayWatch = field(default_factory=GatewayWatch)

    @property
    def nc(self) -> Nats:
        assert self._nc is not None, "provider not connected"
        return self._nc

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        # The coordinator may be unreachable for a long time (a laptop offline): a stop order
        # (SIGTERM from launchd) must not wait for it.
        connecting = asyncio.ensure_future(self._connect())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not connecting.done():
            # Cancelled until it ends (schemas/tasks.py): nats-py's connect retries inside asyncio.wait_for;
            # a lost cancellation once left the daemon never stopping (seen 1 in 12 under load on uvloop).
            await cancel_and_wait(connecting)
            log.info("provider_offline", provider=s.provider_id, served=0, reason="stopped before connecting")
            return
        self._nc = connecting.result()
        self._outbox = Outbox(self._nc)
        await self._serve_pool(stop)

    async def _connect(self) -> Nats:
        s = self.settings
        return await nats_direct.connect(
            s.nats_url,
            name=f"mac-provider-daemon-{s.provider_id}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            user=s.nats_user or None,
            password=s.nats_password or None,
            # A signed-in Mac presents its provider token; the pool's auth callout checks it.
            token=s.provider_token or None,
            # The provider's NATS credentials (JWT + key) from the pool operator, when it uses them.
            user_credentials=str(s.nats_creds) if s.nats_creds else None,
            error_cb=self._nats_error,
        )

    async def _nats_error(self, exc: Exception) -> None:
        # nats-py reports the server's refusal as a plain Error ("nats: 'Authorization Violation'").
        if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower():
            self._refused()
        # One line per error kind a minute, not a traceback every reconnect attempt.
        now, kind = time.monotonic(), type(exc).__name__
        if now - self._nats_errors.get(kind, float("-inf")) >= 60.0:
            self._nats_errors[kind] = now
            log.warning("nats_error", error=kind, detail=str(exc)[:200])

    def _refused(self) -> None:
        """The pool refused this Mac's credentials (token revoked, provider banned): stop its work.

        Its answers could not reach anyone (the pool closed the connection and will not let it
        back in), so generating on only burns the owner's Mac. The daemon stays up and keeps
        trying: an unban lets it back in; a revoked token needs `mac-provider-daemon login`.
        """
        if self._inflight:
            log.warning("pool_refused_requests_stopped", requests=len(self._inflight))
        for inflight in list(self._inflight.values()):
            inflight.cancel.cancel("pool_refused")
        if not self._refused_logged:
            self._refused_logged = True
            log.error(
                "pool_refused",
                provider=self.settings.provider_id,
                hint="the pool refused this Mac's credentials (revoked or banned?): "
                "run `mac-provider-daemon status`, or `mac-provider-daemon login` again",
            )

    async def _serve_pool(self, stop: asyncio.Event) -> None:
        s = self.settings
        # Straight from the read loop (schemas/nats_direct.py): the request's task starts a loop turn sooner.
        await nats_direct.subscribe_requests(self.nc, subjects.work(s.provider_id), self._on_work)
        await self.nc.subscribe(subjects.cancel(s.provider_id), cb=self._on_cancel)
        await self.nc.subscribe(subjects.PROBE, cb=self._on_probe)
        await self.nc.subscribe(subjects.drain(s.provider_id), cb=self._on_drain)
        await self.nc.subscribe(subjects.notices(s.provider_id), cb=self._on_notice)
        beats = asyncio.create_task(self._heartbeats(), name="heartbeats")
        watching = asyncio.create_task(self._watch_gateways(), name="gateway-watch")
        self.engine.add_listener(self.engine_changed)
        log.info("provider_online", provider=s.provider_id, model=self.engine.model_id, nats=s.nats_url_redacted)
        try:
            await stop.wait()
        finally:
            await self._drain()
            if self._outbox is not None:
                # The last frames of the requests that just finished go before the connection does.
                await self._outbox.close()
            await cancel_and_wait(beats)
            await cancel_and_wait(watching)
            with contextlib.suppress(Exception):
                await self.nc.publish(
                    subjects.leave(s.provider_id),
                    bus.encode(bus.Leave(provider_id=s.provider_id, boot_id=self.boot_id)),
                )
                await self.nc.drain()
            outbox = self._outbox
            log.info(
                "provider_offline",
                provider=s.provider_id,
                served=self.served,
                bundles=outbox.bundles if outbox else 0,
                bundled_frames=outbox.bundled_frames if outbox else 0,
            )

    async def _drain(self) -> None:
        """Stop taking work, tell the pool, and let in-flight requests finish."""
        self.draining = True
        with contextlib.suppress(Exception):
            await self._publish_heartbeat()
        pending = [f.task for f in self._inflight.values()]
        if pending:
            log.info("draining", in_flight=len(pending))
            _, late = await asyncio.wait(pending, timeout=self.settings.drain_timeout_s)
            for task in late:
                task.cancel()
            if late:
                # Each says `provider_stopping` to its gateway as it ends: let those frames be made.
                await asyncio.wait(late, timeout=1.0)

    async def _on_drain(self, msg: Msg) -> None:
        """An operator drained us (`mac-provider admin providers drain`): the same path as SIGTERM, minus leaving."""
        if not self.draining:
            log.info("drain_requested", provider=self.settings.provider_id)
            self._operator_drain = asyncio.create_task(self._drain(), name="operator-drain")

    # ---- heartbeats ------------------------------------------------------------------

    def heartbeat(self) -> bus.Heartbeat:
        c = self.engine.capacity()
        return bus.Heartbeat(
            provider_id=self.settings.provider_id,
            daemon_version=__version__,
            boot_id=self.boot_id,
            models=c.models,
            slots=c.slots,
            # A worker that is restarting takes nothing: no free slot, no queue.
            slots_free=max(0, c.slots - c.running) if c.accepting else 0,
            queue_depth=c.queued,
            queue_limit=c.queue_limit,
            decode_tps=round(c.decode_tps, 2),
            interval_s=self.settings.heartbeat_s,
            sent_at_ms=int(time.time() * 1000),
            draining=self.draining,
            worker=c.worker,
            cached_conversations=list(self._conversations),
            memory_available_bytes=self._memory.get(),
        )

    def engine_changed(self) -> None:
        """The worker crashed, restarted or unloaded: tell the pool now, not at the next beat."""
        if self.engine.capacity().worker != "healthy":
            self._conversations.clear()  # that prompt cache is gone with the worker
        if self._nc is not None and not self._nc.is_closed:
            task = asyncio.ensure_future(self._publish_heartbeat())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _publish_heartbeat(self) -> None:
        await self.nc.publish(subjects.heartbeat(self.settings.provider_id), bus.encode(self.heartbeat()))

    async def _heartbeats(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self._publish_heartbeat()
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _on_probe(self, msg: Msg) -> None:
        await self._publish_heartbeat()

    async def _watch_gateways(self) -> None:
        # Runs while draining too: a dead gateway's requests must not hold the drain until their end.
        while True:
            await asyncio.sleep(GATEWAY_CHECK_S)
            self._stop_orphans()

    def _stop_unwanted(self, gateway_id: str, wanted: set[str]) -> None:
        """Stop this gateway's requests that its last two notices left out: it does not want them any more
        (it cancelled them while our connection was down, and the cancel was lost)."""
        stopped = 0
        for request_id, inflight in self._inflight.items():
            if inflight.gateway_id != gateway_id or inflight.keepalive_s <= 0 or inflight.cancel.cancelled:
                continue
            if request_id in wanted:
                inflight.left_out = 0
                continue
            inflight.left_out += 1
            if inflight.left_out >= UNWANTED_AFTER:
                inflight.cancel.cancel("not_wanted")
                stopped += 1
        if stopped:
            log.warning("unwanted_requests_stopped", gateway=gateway_id, requests=stopped)

    def _stop_orphans(self) -> None:
        """Stop the requests of gateways gone silent: their answers would reach nobody."""
        stopped: dict[str, int] = {}
        for inflight in self._inflight.values():
            if not inflight.cancel.cancelled and self._gateways.silent(inflight.gateway_id, inflight.keepalive_s):
                inflight.cancel.cancel(GATEWAY_LOST)
                stopped[inflight.gateway_id] = stopped.get(inflight.gateway_id, 0) + 1
        for gateway_id, count in stopped.items():
            log.warning("gateway_lost_requests_stopped", gateway=gateway_id, requests=count)
        self._gateways.keep_only(inflight.gateway_id for inflight in self._inflight.values())

    # ---- work --------------------------------------------------------------------------

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = _CANCEL.decode(msg.data)
        except msgspec.DecodeError:
            return
        inflight = self._inflight.get(cancel.request_id)
        if inflight is not None:
            inflight.cancel.cancel(cancel.reason)
            log.info("request_cancelled", request_id=cancel.request_id, reason=cancel.reason)

    async def _on_notice(self, msg: Msg) -> None:
        try:
            notice = _NOTICE.decode(msg.data)
        except msgspec.DecodeError:
            return
        if notice.provider_id != self.settings.provider_id:
            return
        if isinstance(notice, bus.GatewayAlive):
            self._gateways.heard(notice.gateway_id)
            if notice.request_ids is not None:
                self._stop_unwanted(notice.gateway_id, set(notice.request_ids))
            return
        before = self.pool_notice.models if self.pool_notice is not None else None
        self.pool_notice, self.pool_notice_at = notice, time.time()
        if notice.models != before:
            for m in notice.models:
                log.info(
                    "pool_verdict",
                    model=m.model,
                    status=m.status,
                    routed=m.routed,
                    weights_sha256=m.weights_sha256,
                    detail=m.detail,
                )

    def _on_work(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        # Only answer on our own reply prefix: NATS would refuse anything else anyway.
        if not reply.startswith(subjects.reply_prefix(self.settings.provider_id)):
            log.warning("bad_reply_subject", reply=reply)
            return
        replier = _Replier(self.nc, reply)
        try:
            request = _REQUEST.decode(data)
        except msgspec.DecodeError as exc:
            self.metrics.outcome("bad_request")
            # Called from the read loop: the answer goes from a task of its own.
            failing = asyncio.create_task(replier.fail("bad_request", f"undecodable request: {exc}"))
            self._background.add(failing)
            failing.add_done_callback(self._background.discard)
            return
        if request.bundle and self._outbox is not None:
            with contextlib.suppress(subjects.SubjectError):  # not a reply subject a gateway makes: frames alone
                replier.bundle_via(self._outbox)
        if request.request_id in self._inflight:
            return  # a duplicate delivery of a request we are already running
        # The gateway's trace context (W3C traceparent); a malformed header is ignored.
        remote = remote_parent(headers)
        gateway_id = ""
        with contextlib.suppress(subjects.SubjectError):
            gateway_id = subjects.parse_reply(reply)[1]
            self._gateways.heard(gateway_id)
        cancel = CancelToken()
        task = asyncio.create_task(self._traced(request, replier, cancel, remote), name=f"req-{request.request_id}")
        self._inflight[request.request_id] = _InFlight(cancel, task, gateway_id, request.keepalive_ms / 1000)
        task.add_done_callback(lambda _: self._inflight.pop(request.request_id, None))

    def _remember(self, request: bus.InferenceRequest, answer: str) -> None:
        """The prompt cache now holds this conversation: a next turn here starts warm."""
        turns = [(m.role, m.content) for m in request.messages] + [("assistant", answer)]
        key = conversation_key(turns)
        if key in self._conversations:
            self._conversations.remove(key)
        self._conversations.append(key)

    async def _traced(
        self, request: bus.InferenceRequest, replier: _Replier, cancel: CancelToken, remote: SpanContext | None
    ) -> None:
        """One request in its own task: its log lines carry its request id and trace id, its spans join the trace."""
        span = None
        if self.tracing is not None:
            span = self.tracing.start(
                "work",
                parent=parent_context(remote),
                attributes={"mp.request_id": request.request_id, "mp.provider": self.settings.provider_id},
            )
        context = span.get_span_context() if span is not None else remote
        structlog.contextvars.bind_contextvars(
            request_id=request.request_id, **({"trace_id": f"{context.trace_id:032x}"} if context else {})
        )
        try:
            outcome = await self._serve(request, replier, cancel, span)
        except BaseException:
            outcome = "provider_stopping"
            raise
        finally:
            if span is not None:
                span.set_attribute("mp.outcome", outcome)
                if outcome not in ("stop", "length", "tool_calls", "cancelled"):
                    span.set_status(StatusCode.ERROR, outcome)
                span.end()

    async def _serve(
        self, request: bus.InferenceRequest, replier: _Replier, cancel: CancelToken, span: Span | None = None
    ) -> str:
        """Answer one request on the bus; returns how it ended (its finish reason or error code)."""
        if self.draining:
            self.metrics.outcome("provider_draining")
            await replier.fail("provider_draining", "provider is draining", retryable=True)
            return "provider_draining"
        if not self.engine.serves(request.model):
            self.metrics.outcome("model_not_loaded")
            await replier.fail("model_not_loaded", f"{request.model!r} is not loaded here", retryable=True)
            return "model_not_loaded"
        tracing = self.tracing if span is not None else None
        try:
            # Off the loop and time-limited (templates and schemas): heartbeats and other requests go on.
            prepare_started, prepare_ns = time.monotonic(), time.time_ns()
            prepare_span = tracing.start("prepare", parent=span, start_time=prepare_ns) if tracing else None
            try:
                prepared = await self.engine.prepare(request)
            finally:
                if prepare_span is not None:
                    prepare_span.end()
            self.metrics.prepare.observe(time.monotonic() - prepare_started)
            generation_ns = time.time_ns()
            await replier.accept(len(prepared.prompt_tokens), self.engine.queued())
            finished: bus.Finished | None = None
            answer: list[str] = []
            # Every chunk ready when the sender runs goes in one frame (daemon/frames.py).
            gather_s = request.frame_ms / 1000  # a whole answer: one frame per that long (0: a stream)
            async for event in coalesced(self.engine.generate(prepared, cancel), gather_s=gather_s):
                if isinstance(event, bus.Finished):
                    finished = event
                else:
                    answer.append(event.text)
                    await replier.send(
                        bus.Delta,
                        text=event.text,
                        tokens=event.tokens,
                        tool_calls=list(event.tool_calls),
                        logprobs=list(event.logprobs),
                        token_ids=list(event.token_ids),
                        reasoning=event.reasoning,
                    )
            assert finished is not None
            if finished.finish_reason == "cancelled" and cancel.reason == GATEWAY_LOST:
                # Not the gateway's own cancel: one that was only paused (not dead) fails the request over,
                # and the buyer's answer goes on from another provider instead of ending here as complete.
                self.metrics.outcome("gateway_unheard")
                await replier.fail("gateway_unheard", "the provider stopped hearing from this gateway")
                return "gateway_unheard"
            await replier.done(finished)
            self.served += 1
            if request.prompt is None and finished.finish_reason in ("stop", "length"):
                self._remember(request, "".join(answer))
            self.metrics.finished(
                finish_reason=finished.finish_reason,
                prompt_tokens=finished.prompt_tokens,
                completion_tokens=finished.completion_tokens,
                cached_tokens=finished.cached_tokens,
                queue_s=finished.queue_ms / 1000,
                ttft_s=finished.ttft_ms / 1000,
                generation_s=finished.generation_ms / 1000,
            )
            if tracing is not None:
                _generation_spans(tracing, span, generation_ns, finished)
            log.info(
                "request_done",
                finish=finished.finish_reason,
                prompt_tokens=finished.prompt_tokens,
                completion_tokens=finished.completion_tokens,
                cached_tokens=finished.cached_tokens,
                ttft_ms=round(finished.ttft_ms, 1),
                generation_ms=round(finished.generation_ms, 1),
            )
            return finished.finish_reason
        except EngineError as exc:
            log.info("request_failed", code=exc.code, after_accept=replier.seq > 0)
            self.metrics.outcome(exc.code)
            await replier.fail(exc.code, exc.message, retryable=exc.retryable and replier.seq == 0, param=exc.param)
            return exc.code
        except asyncio.CancelledError:
            self.metrics.outcome("provider_stopping")
            cancel.cancel("daemon_stopping")
            with contextlib.suppress(Exception):
                await replier.fail("provider_stopping", "the provider is shutting down")
            raise
        except Exception as exc:
            log.exception("request_failed")
            self.metrics.outcome("provider_internal_error")
            await replier.fail("provider_internal_error", type(exc).__name__)
            return "provider_internal_error"


def _generation_spans(tracing: Tracing, parent: Span | None, started_ns: int, finished: bus.Finished) -> None:
    """`queue_wait` then `generate`, from the engine's own timings (no span is kept open per token)."""
    queued_ns = started_ns + int(finished.queue_ms * 1e6)
    tracing.start("queue_wait", parent=parent, start_time=started_ns).end(end_time=queued_ns)
    generate = tracing.start(
        "generate",
        parent=parent,
        start_time=queued_ns,
        attributes={
            "mp.finish_reason": finished.finish_reason,
            "mp.prompt_tokens": finished.prompt_tokens,
            "mp.cached_tokens": finished.cached_tokens,
            "mp.completion_tokens": finished.completion_tokens,
            "mp.ttft_ms": round(finished.ttft_ms, 1),
        },
    )
    generate.end(end_time=queued_ns + int(finished.generation_ms * 1e6))
