"""The daemon's Prometheus metrics, served at `/metrics` on the admin port (with the admin token).

Counted as each pool request ends (daemon/provider.py): requests by outcome,
tokens, prepare, queue-wait, time-to-first-token and decoding histograms, and
prompt-cache hits. Read when scraped: the worker (state, restarts, batch
occupancy, prompt-cache size), the engine's running and queued requests, the
pool connection. One registry per daemon, passed explicitly (never
prometheus_client's global one).
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import TYPE_CHECKING

from msgspec import UnsetType
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.engine.report import BatchStatus, PromptCacheStatus
from schemas import bus, codes

if TYPE_CHECKING:
    from daemon.runtime import Daemon

# How a request ends: its finish reason, or the code it failed with (anything else: `other`).
OUTCOMES = frozenset({*typing.get_args(bus.FinishReason), *codes.FAIL_CODES})
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
_RATE = (1.0, 2.5, 5.0, 10.0, 20.0, 35.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0)


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter(
            "mp_daemon_requests", "Pool requests by outcome (finish reason or error code).", ["outcome"], registry=r
        )
        self.completion_tokens = Counter("mp_daemon_generated_tokens", "Tokens generated for the pool.", registry=r)
        self.prompt_tokens = Counter("mp_daemon_prompt_tokens", "Prompt tokens of the pool's requests.", registry=r)
        self.cached_tokens = Counter(
            "mp_daemon_prompt_cached_tokens",
            "Prompt tokens read from the prompt cache instead of prefilled.",
            registry=r,
        )
        self.cache_lookups = Counter(
            "mp_daemon_prompt_cache_requests",
            "Requests whose prompt started from the prompt cache (hit) or from scratch (miss).",
            ["result"],
            registry=r,
        )
        self.prepare = Histogram(
            "mp_daemon_prepare_seconds",
            "Chat template and JSON schema work before a request is accepted.",
            buckets=_SECONDS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "mp_daemon_queue_wait_seconds", "Time a request waited for a batch slot.", buckets=_SECONDS, registry=r
        )
        self.ttft = Histogram(
            "mp_daemon_ttft_seconds",
            "Time from joining the batch to the first token (prefill).",
            buckets=_SECONDS,
            registry=r,
        )
        self.decode_rate = Histogram(
            "mp_daemon_decode_tokens_per_second",
            "Tokens per second of each answer after its first token.",
            buckets=_RATE,
            registry=r,
        )
        self._outcomes = {o: self.requests.labels(o) for o in (*OUTCOMES, "other")}
        self._hit = self.cache_lookups.labels("hit")
        self._miss = self.cache_lookups.labels("miss")

    def outcome(self, outcome: str) -> None:
        self._outcomes.get(outcome, self._outcomes["other"]).inc()

    def finished(
        self,
        *,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        queue_s: float,
        ttft_s: float,
        generation_s: float,
    ) -> None:
        self.outcome(finish_reason)
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        self.cached_tokens.inc(cached_tokens)
        (self._hit if cached_tokens > 0 else self._miss).inc()
        self.queue_wait.observe(queue_s)
        if completion_tokens:
            self.ttft.observe(ttft_s)
        decoding = generation_s - ttft_s
        if completion_tokens >= 2 and decoding > 0:
            self.decode_rate.observe((completion_tokens - 1) / decoding)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


async def present(daemon: Daemon) -> list[Metric]:
    """What the engine, the worker and the pool connection say now."""
    engine = daemon.engine
    families: list[Metric] = [
        _gauge("mp_daemon_pool_connected", "1 while connected to the pool's NATS.", int(daemon.pool_connected())),
        _gauge("mp_daemon_draining", "1 while draining (no new work).", int(daemon.draining)),
        _gauge("mp_daemon_requests_running", "Requests generating now.", engine.running()),
        _gauge("mp_daemon_requests_queued", "Requests waiting for a batch slot.", engine.queued()),
        _gauge("mp_daemon_slots", "Sequences decoded together in one batch.", engine.slots),
    ]
    bundles, bundled = daemon.bundles()
    families += [
        CounterMetricFamily(
            "mp_daemon_frame_bundles", "Messages that carried several requests' frames to one gateway.", value=bundles
        ),
        CounterMetricFamily("mp_daemon_bundled_frames", "Frames sent in bundles rather than alone.", value=bundled),
    ]
    own = await engine.status()
    worker = own.worker
    if isinstance(worker.restarts, UnsetType) or isinstance(worker.state, UnsetType):
        return families  # no worker process (the synthetic engine)
    families.append(
        CounterMetricFamily(
            "mp_daemon_worker_restarts", "Inference worker restarts since start.", value=worker.restarts
        )
    )
    state = GaugeMetricFamily(
        "mp_daemon_worker_state", "The inference worker's state (1 for the current one).", labels=["state"]
    )
    state.add_metric([worker.state], 1)
    families.append(state)
    families.append(_gauge("mp_daemon_decode_tokens_per_second_avg", "Recent decoding speed.", engine.decode_tps()))
    batch, cache = own.batch, own.prompt_cache
    if isinstance(batch, BatchStatus) and isinstance(cache, PromptCacheStatus):
        # The worker answered the status ping.
        families += [
            _gauge("mp_daemon_batch_active", "Sequences in the batch now.", batch.active_rows),
            _gauge("mp_daemon_batch_waiting", "Sequences waiting to join the batch.", batch.waiting),
            _gauge(
                "mp_daemon_batch_occupancy",
                "Share of the batch's slots in use now.",
                batch.active_rows / max(1, engine.slots),
            ),
            _gauge("mp_daemon_prompt_cache_entries", "Prompts in the worker's cache.", cache.entries),
            _gauge("mp_daemon_prompt_cache_bytes", "Bytes the worker's prompt cache holds.", cache.bytes),
        ]
    return families


class _Scrape(Collector):
    def __init__(self, metrics: DaemonMetrics, families: list[Metric]) -> None:
        self._metrics = metrics
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics.registry.collect()
        yield from self._families


async def exposition(daemon: Daemon) -> bytes:
    return generate_latest(_Scrape(daemon.metrics, await present(daemon)))
