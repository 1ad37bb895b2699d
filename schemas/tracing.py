"""OpenTelemetry traces for the control plane and the daemon: settings, the tracer, W3C trace context on the bus.

A buyer request is one trace: the gateway's request span, its `dispatch` child
(one per provider that takes the request), and the daemon's spans under that.
The trace context crosses NATS in the work message's `traceparent` header (W3C
Trace Context, version 00); nothing else is propagated (no `tracestate`, no
baggage). A header from the bus is hostile input: only an exact, well-formed
`traceparent` is used, anything else is ignored and the daemon starts a trace
of its own.

Off by default (`MP_OTEL_EXPORTER=none`): no tracer exists, the SDK is not even
imported, and the request path only tests `tracing is None`. Each process makes
its own `TracerProvider` and passes its `Tracing` explicitly (the SDK's global
provider is never set).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACEPARENT = "traceparent"
EXPORTERS = ("none", "console", "otlp", "jsonl:<path>")
DEFAULT_OTLP_ENDPOINT = "http://127.0.0.1:4318/v1/traces"
# version 00: 2 + 1 + 32 + 1 + 16 + 1 + 2 characters, lowercase hex only.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACEPARENT_LEN = 55


class TracingSettingsError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TracingConfig:
    # none | console | otlp | jsonl (one JSON object per span per line, to `jsonl_path`: for tests and debugging).
    exporter: str = "none"
    jsonl_path: Path | None = None
    # The OTLP/HTTP traces endpoint (a collector, Jaeger, Tempo...).
    endpoint: str = DEFAULT_OTLP_ENDPOINT
    # Share of new traces recorded; a daemon follows the gateway's decision (the traceparent's sampled flag).
    sample_ratio: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.exporter != "none"


def config_from_env(env: Mapping[str, str]) -> TracingConfig:
    """MP_OTEL_EXPORTER, MP_OTEL_ENDPOINT, MP_OTEL_SAMPLE_RATIO; TracingSettingsError names the bad one."""
    raw = (env.get("MP_OTEL_EXPORTER") or "none").strip()
    kind, _, path = raw.partition(":")
    if kind == "jsonl":
        if not path:
            raise TracingSettingsError("MP_OTEL_EXPORTER=jsonl needs a file: jsonl:/path/to/spans.jsonl")
        jsonl_path: Path | None = Path(path).expanduser().absolute()
    elif raw in ("none", "console", "otlp"):
        jsonl_path = None
    else:
        raise TracingSettingsError(f"MP_OTEL_EXPORTER must be one of {', '.join(EXPORTERS)}, got {raw!r}")
    endpoint = env.get("MP_OTEL_ENDPOINT") or DEFAULT_OTLP_ENDPOINT
    if not endpoint.startswith(("http://", "https://")):
        raise TracingSettingsError(f"MP_OTEL_ENDPOINT must be an http(s) URL, got {endpoint!r}")
    try:
        ratio = float(env.get("MP_OTEL_SAMPLE_RATIO") or "1")
    except ValueError:
        raise TracingSettingsError("MP_OTEL_SAMPLE_RATIO must be a number between 0 and 1") from None
    if not 0.0 <= ratio <= 1.0:
        raise TracingSettingsError(f"MP_OTEL_SAMPLE_RATIO must be between 0 and 1, got {ratio}")
    return TracingConfig(exporter=kind, jsonl_path=jsonl_path, endpoint=endpoint, sample_ratio=ratio)


class Tracing:
    """One process's tracer (its own TracerProvider); `shutdown` flushes what is still buffered."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self.tracer = provider.get_tracer("mac-provider")

    def start(
        self,
        name: str,
        *,
        parent: Context | Span | None = None,
        attributes: Mapping[str, Any] | None = None,
        start_time: int | None = None,
    ) -> Span:
        """A span under `parent` (a span, a context from `remote_parent`), or the root of a new trace.

        Never the ambient context: a span's parent is always said explicitly.
        """
        context = trace.set_span_in_context(parent, Context()) if isinstance(parent, Span) else parent or Context()
        return self.tracer.start_span(name, context=context, attributes=attributes, start_time=start_time)

    def shutdown(self) -> None:
        self._provider.shutdown()


def open_tracing(config: TracingConfig, *, service: str, instance: str) -> Tracing | None:
    """The process's Tracing for `config`, or None when traces are off."""
    if not config.enabled:
        return None
    # Imported only here: with traces off, the SDK costs nothing, not even its import.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
        SpanExporter,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    # Resource(...) rather than Resource.create(): the settings say everything, not OTEL_* variables.
    resource = Resource({"service.name": service, "service.instance.id": instance})
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)), resource=resource, shutdown_on_exit=False
    )
    exporter: SpanExporter
    if config.exporter == "jsonl":
        from schemas.tracing_jsonl import JsonLinesExporter

        assert config.jsonl_path is not None
        # Written as each span ends, so a reader (a test) sees it at once.
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(config.jsonl_path)))
        return Tracing(provider)
    if config.exporter == "console":
        exporter = ConsoleSpanExporter(service_name=service)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.endpoint, headers={}, timeout=10)
    # Batched off the event loop: a slow collector never delays a request.
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)


# ---- W3C trace context on the bus -------------------------------------------------------------


def traceparent(span: Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags) & 0xFF:02x}"


def headers_for(span: Span | None) -> dict[str, str] | None:
    """The NATS headers carrying `span`'s context (None: no span, no headers)."""
    if span is None or not span.get_span_context().is_valid:
        return None
    return {TRACEPARENT: traceparent(span)}


def parse_traceparent(value: object) -> SpanContext | None:
    """A remote span context from a `traceparent` value, or None unless it is exactly well-formed."""
    if not isinstance(value, str) or len(value) != _TRACEPARENT_LEN:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id = int(match.group(1), 16), int(match.group(2), 16)
    if trace_id == 0 or span_id == 0:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match.group(3), 16) & 0x01))


def remote_parent(headers: Mapping[str, Any] | None) -> SpanContext | None:
    """The trace context a bus message carries in its headers, if any is usable."""
    if not headers:
        return None
    try:
        return parse_traceparent(headers.get(TRACEPARENT))
    except Exception:
        return None


def parent_context(remote: SpanContext | None) -> Context | None:
    return trace.set_span_in_context(NonRecordingSpan(remote), Context()) if remote is not None else None


def trace_id_hex(ctx: SpanContext) -> str:
    return f"{ctx.trace_id:032x}"
