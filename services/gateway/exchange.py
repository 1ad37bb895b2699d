"""One buyer request's record: metering ticket, timings, the summary log line.

Whatever ends a request (success, error, the buyer hanging up, a timeout),
`finish()` runs exactly once: it settles the reservation and writes the one
summary line, and nothing it does can be interrupted by the cancellation that
may have ended the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry.trace import Span, StatusCode

from schemas import bus
from services.metrics.labels import OTHER
from services.usage.metering import Metering, Ticket

if TYPE_CHECKING:
    from schemas.logs import SummaryLines
    from services.metrics.registry import Metrics

log = structlog.get_logger("gateway")

# Summary status → ledger outcome.
_LEDGER_OUTCOME = {"ok": "ok", "client_disconnected": "cancelled", "request_timeout": "timeout"}


@dataclass
class Exchange:
    request_id: str
    # The summary line's event name, one per surface (chat_completion, text_completion, ...).
    event: str = "chat_completion"
    key_id: int | None = None
    model: str | None = None
    stream: bool = False
    ticket: Ticket | None = None
    started: float = field(default_factory=time.monotonic)
    provider: str | None = None
    cached_tokens: int = 0
    ttft_ms: float | None = None
    # Where the time to the first token went (the summary line): from the request's arrival to its dispatch
    # (auth, body, quota: ours alone), and from there to a provider's acceptance (NATS both ways, the
    # provider's own admission, any provider that declined first, a JSON format's grammar when asked).
    dispatch_ms: float | None = None
    accept_ms: float | None = None
    status: str = "ok"
    # Set when nothing reached a provider, or providers failed before delivering a token:
    # the request is given back to the quota and nothing is billed.
    refund: bool = False
    # The app's metrics (None where an Exchange is built alone) and the model label this request
    # counts under (a model the pool serves, else `other`: services/metrics/labels.py).
    metrics: Metrics | None = None
    model_label: str = OTHER
    # The request's span (None: traces are off); it ends with the request.
    span: Span | None = None
    # Writes the summary line (schemas/logs.py; None: through structlog, where an Exchange is built alone).
    summary: SummaryLines | None = None
    # Delta frames received (a frame holds every token the provider had ready, or gathered: frame_ms).
    frames: int = 0
    _finished: bool = False
    _settling: asyncio.Future[None] | None = None
    _first_token_at: float = 0.0
    _last_token_at: float = 0.0
    _inter_token: Any = None
    # Frames joined to a run's first (a gap of 0 before each), observed together when the run is taken.
    _zero_gaps: int = 0

    def label(self, model: str, served: Any) -> None:
        """The model is known: the labels this request's metrics use, and its span's attribute."""
        if self.span is not None:
            self.span.set_attribute("mp.model", model[:128])
        if self.metrics is not None:
            self.model_label = self.metrics.models(model, served)
            self._inter_token = self.metrics.model_inter_token(self.model_label)

    def accepted(self, provider_id: str, accepted: bus.Accepted, *, dispatched_at: float, accepted_at: float) -> None:
        self.dispatch_ms = (dispatched_at - self.started) * 1000
        self.accept_ms = (accepted_at - dispatched_at) * 1000
        self.provider = provider_id
        if self.ticket is not None:
            self.ticket.provider_id = provider_id
            self.ticket.prompt_tokens = accepted.prompt_tokens

    def delta(self, frame: bus.Delta) -> None:
        self.frames += 1
        now = time.monotonic()
        if self.ttft_ms is None:
            self.ttft_ms = (now - self.started) * 1000
            self._first_token_at = now
        elif self._inter_token is not None and frame.token_ids:
            self._inter_token.observe((now - self._last_token_at) / len(frame.token_ids))
        self._last_token_at = now
        if self.ticket is not None:
            # What the gateway received, never what the provider declares.
            self.ticket.completion_tokens += len(frame.token_ids)

    def joined_frames(self, run: list[bus.Delta], start: int) -> None:
        """`delta` for each of `run[start:]`: frames taken together with the run's first (a stream's frames
        that queued up while the gateway was busy), so each one's time since the one before is 0, counted
        without reading the clock, all in one call. Every frame of a busy stream comes here."""
        tokens = gaps = 0
        for frame in itertools.islice(run, start, None):
            n = len(frame.token_ids)
            if n:
                tokens += n
                gaps += 1
        self.frames += len(run) - start
        self._zero_gaps += gaps
        if self.ticket is not None:
            # What the gateway received, never what the provider declares.
            self.ticket.completion_tokens += tokens

    def run_taken(self) -> None:
        """The frames joined to a run's first are all taken: the last token reached the gateway now (one
        clock read per run, not per frame). The answer's decoding time ends here, so an answer whose every
        token came in one run still has one (`mp_gateway_decode_tokens_per_second`)."""
        self._last_token_at = time.monotonic()
        self._observe_zero_gaps()

    def _observe_zero_gaps(self) -> None:
        if self._zero_gaps:
            if self._inter_token is not None:
                self._inter_token.observe_zeros(self._zero_gaps)
            self._zero_gaps = 0

    def done(self, frame: bus.Done) -> tuple[int, int]:
        """(prompt, completion) tokens to bill: never more completion than the gateway saw."""
        self.cached_tokens = min(frame.cached_tokens, frame.prompt_tokens)
        if self.ticket is None:
            return frame.prompt_tokens, frame.completion_tokens
        self.ticket.prompt_tokens = frame.prompt_tokens
        self.ticket.completion_tokens = min(frame.completion_tokens, self.ticket.completion_tokens)
        return self.ticket.prompt_tokens, self.ticket.completion_tokens

    def finishing(self, metering: Metering) -> asyncio.Future[None] | None:
        """`finish` started now, in this call: the summary line, the counts, and the settlement on its way
        (its future, None without one). The first call decides; later ones return the same settlement."""
        if self._finished:
            return self._settling
        self._finished = True
        self._log()
        if self.metrics is not None:
            self._count(self.metrics)
        if self.span is not None:
            self._end_span(self.span)
        if self.ticket is not None:
            self._settling = metering.settling(
                self.ticket,
                # Refunded before any provider took it: unavailable; after (nothing delivered): failed.
                outcome=_LEDGER_OUTCOME.get(
                    self.status, "unavailable" if self.refund and self.provider is None else "failed"
                ),
                cached_tokens=self.cached_tokens,
                ttft_ms=self.ttft_ms,
                refund=self.refund,
            )
        return self._settling

    async def finish(self, metering: Metering) -> None:
        """Log, count and settle the request, once; returns when its settlement is stored (or failed)."""
        settling = self.finishing(metering)
        if settling is not None:
            # The future is only this wait's: cancelling the request's task does not stop the settlement
            # (Metering.settling), so no shield.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await settling

    def _count(self, m: Metrics) -> None:
        self._observe_zero_gaps()  # a run cut short (its request failed) still counts its frames' gaps
        model = self.model_label
        m.request(self.event, model, m.codes(self.status)).inc()
        if self.ttft_ms is not None:
            m.model_ttft(model).observe(self.ttft_ms / 1000)
        t = self.ticket
        if t is None:
            return
        if t.completion_tokens:
            m.model_completion_tokens(model).inc(t.completion_tokens)
            decoding = self._last_token_at - self._first_token_at
            if t.completion_tokens >= 2 and decoding > 0:
                m.model_decode_rate(model).observe((t.completion_tokens - 1) / decoding)
        if t.prompt_tokens and self.provider is not None:
            m.model_prompt_tokens(model).inc(t.prompt_tokens)

    def _end_span(self, span: Span) -> None:
        t = self.ticket
        span.set_attribute("mp.outcome", self.status[:64])
        span.set_attribute("mp.stream", self.stream)
        if self.provider is not None:
            span.set_attribute("mp.provider", self.provider)
        if t is not None:
            span.set_attribute("mp.prompt_tokens", t.prompt_tokens)
            span.set_attribute("mp.completion_tokens", t.completion_tokens)
        if self.ttft_ms is not None:
            span.set_attribute("mp.ttft_ms", round(self.ttft_ms, 1))
        if self.status != "ok":
            span.set_status(StatusCode.ERROR, self.status[:64])
        span.end()

    def _log(self) -> None:
        t = self.ticket
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "key_id": self.key_id,
            "model": self.model,
            "provider": self.provider,
            "stream": self.stream,
            "prompt_tokens": t.prompt_tokens if t else 0,
            "completion_tokens": t.completion_tokens if t else 0,
            "cached_tokens": self.cached_tokens,
            "frames": self.frames,
            "dispatch_ms": None if self.dispatch_ms is None else round(self.dispatch_ms, 2),
            "accept_ms": None if self.accept_ms is None else round(self.accept_ms, 2),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 2),
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
            "status": self.status,
        }
        if self.span is not None:
            fields["trace_id"] = f"{self.span.get_span_context().trace_id:032x}"
        if self.summary is None:
            log.info(self.event, **fields)
        else:
            self.summary(self.event, fields)
