"""What metrics and traces add to one request, in microseconds of CPU: `just bench observability`.

In process, on the real objects: for a streamed answer of TOKENS tokens, the
gateway's per-request work that observability adds (the response hook on the
start and on every chunk, the request's labels, a timestamp and an inter-token
observation per frame, the counters and histograms at the end), measured
against the same work with metrics off; then a traced request (request and
dispatch spans, the traceparent header) with spans batched to an exporter that
drops them, and the daemon's side (its counters, then its spans).
A benchmark mode, not a test: a figure for the README.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from daemon.engine.base import Finished
from daemon.metrics import DaemonMetrics
from schemas import bus
from schemas.tracing import Tracing, headers_for
from services.gateway.exchange import Exchange
from services.metrics.http import count_responses
from services.metrics.registry import Metrics

TOKENS = 64
REQUESTS = 5000
ROUNDS = 5


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _delta(seq: int) -> bus.Delta:
    return bus.Delta(seq=seq, text="x", tokens=1, token_ids=[7])


def _best(fn: Callable[[], None]) -> float:
    """Microseconds per request: the best of ROUNDS rounds of REQUESTS requests (least disturbed by others)."""
    times = []
    for _ in range(ROUNDS):
        started = time.process_time()
        for _ in range(REQUESTS):
            fn()
        times.append((time.process_time() - started) / REQUESTS * 1e6)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    metrics = Metrics()
    hook = count_responses(metrics)
    deltas = [_delta(i) for i in range(TOKENS)]
    start: Any = {"type": "http.response.start", "status": 200, "headers": []}
    chunk: Any = {"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True}
    scope: Any = {"path_template": "/v1/chat/completions", "method": "POST", "state": {}}
    loop = asyncio.new_event_loop()

    def request(m: Metrics | None) -> None:
        ex = Exchange(request_id="r", metrics=m)
        ex.label("tiny", lambda _: True)
        for d in deltas:
            ex.delta(d)
        if m is not None:
            ex._count(m)

    async def responses() -> None:
        await hook(start, scope)
        for _ in range(TOKENS + 3):
            await hook(chunk, scope)

    async def no_hook() -> None:
        for _ in range(TOKENS + 4):
            pass

    def gateway_off() -> None:
        request(None)
        loop.run_until_complete(no_hook())

    def gateway_on() -> None:
        request(metrics)
        loop.run_until_complete(responses())

    provider = TracerProvider(resource=Resource({"service.name": "bench"}), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(_Drop()))
    tracing = Tracing(provider)

    def traced() -> None:
        span = tracing.start("chat_completion", attributes={"mp.request_id": "r", "mp.surface": "chat_completion"})
        span.set_attribute("mp.model", "tiny")
        dispatch = tracing.start("dispatch", parent=span, attributes={"mp.request_id": "r"})
        headers_for(dispatch)
        dispatch.end()
        for key in ("mp.outcome", "mp.provider"):
            span.set_attribute(key, "x")
        span.end()

    daemon = DaemonMetrics()
    finished = Finished("length", 30, TOKENS, 0, queue_ms=1.0, ttft_ms=20.0, generation_ms=800.0)

    def daemon_counts() -> None:
        daemon.prepare.observe(0.003)
        daemon.finished(
            finish_reason=finished.finish_reason,
            prompt_tokens=finished.prompt_tokens,
            completion_tokens=finished.completion_tokens,
            cached_tokens=finished.cached_tokens,
            queue_s=0.001,
            ttft_s=0.02,
            generation_s=0.8,
        )

    def daemon_spans() -> None:
        work = tracing.start("work", attributes={"mp.request_id": "r"})
        tracing.start("prepare", parent=work).end()
        tracing.start("queue_wait", parent=work).end()
        tracing.start("generate", parent=work, attributes={"mp.completion_tokens": TOKENS}).end()
        work.end()

    off, on = _best(gateway_off), _best(gateway_on)
    rows = [
        (f"gateway, metrics (a {TOKENS}-token stream)", on - off),
        ("gateway, traces on (2 spans + traceparent)", _best(traced)),
        ("daemon, metrics", _best(daemon_counts)),
        ("daemon, traces on (4 spans)", _best(daemon_spans)),
    ]
    print(f"CPU added per request (best of {ROUNDS} x {REQUESTS} requests; traces batched to a dropping exporter):")
    for name, us in rows:
        print(f"  {name:<48} {us:7.1f} us")
    print(f"  (the same simulated gateway work with metrics off: {off:.1f} us)")
    provider.shutdown()
    loop.close()
    return 0
