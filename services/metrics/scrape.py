"""GET /metrics: the app's metrics in Prometheus' text format, for a scraper holding MP_METRICS_TOKEN.

Who may read it: a scrape shows the pool's size, its models and their free
slots, error rates and the database's health, which an operator wants and a
competitor or an attacker timing a flood would like too. So /metrics is not
public: it answers only `Authorization: Bearer <MP_METRICS_TOKEN>` (compared in
constant time; a buyer's `mp_` key is not it), which Prometheus sends from a
`credentials_file`. It is also on no public Ingress path (infra/deploy/k8s),
so the token is the second lock, not the only one. A token rather than a
separate port: the same rule holds wherever the app runs (Kubernetes, the
local cluster behind HAProxy, `mac-provider up`), with nothing to get wrong in
a load balancer's configuration.

What describes the present (the pool view, the connections, the open
reservations, requests in flight) is read here, at scrape time, never kept up
to date on the request path. Postgres is asked `SELECT 1` (bounded) per scrape.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from litestar.connection import ASGIConnection
from litestar.datastructures import State
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.errors import InvalidMetricsToken, MissingMetricsToken
from services.lifecycle import LIFECYCLE, Lifecycle
from services.metrics.labels import MAX_MODELS, OTHER
from services.metrics.registry import Metrics

if TYPE_CHECKING:
    from services.gateway.pool import PoolView
    from services.usage.metering import Metering

# app.state keys: the app's Metrics, and the token /metrics wants (bytes).
METRICS = "metrics"
METRICS_TOKEN = "metrics_token"
# A database slower than this to answer `SELECT 1` counts as unreachable.
_DB_CHECK_S = 2.0


def check_token(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """The guard's check for Auth.METRICS: the scraper's bearer token, or 401."""
    expected: bytes = connection.app.state[METRICS_TOKEN]
    raw = connection.headers.get("authorization")
    if not raw:
        raise MissingMetricsToken("Missing metrics token: send 'Authorization: Bearer <MP_METRICS_TOKEN>'.")
    scheme, _, token = raw.strip().partition(" ")
    # No token configured: nobody reads the metrics (an empty one must not match an empty header).
    if not expected or scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise InvalidMetricsToken("Invalid metrics token.")


def exposition(metrics: Metrics, families: list[Metric]) -> bytes:
    return generate_latest(_Scrape(metrics, families))


class _Scrape(Collector):
    """The app's registry, then what this scrape read of the present."""

    def __init__(self, metrics: Metrics, families: list[Metric]) -> None:
        self._metrics = metrics
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics.registry.collect()
        yield from self._families


async def _reachable(db: Any) -> bool:
    try:
        async with asyncio.timeout(_DB_CHECK_S):
            return bool(await db.fetchval("SELECT 1") == 1)
    except Exception:
        return False


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def pool_families(pool: PoolView) -> list[Metric]:
    """Pool size, slots, free slots and queue depth per model (the largest MAX_MODELS models; the rest summed)."""
    providers = GaugeMetricFamily("mp_pool_providers", "Providers routed for a model now.", labels=["model"])
    slots = GaugeMetricFamily("mp_pool_slots", "Slots of the providers serving a model.", labels=["model"])
    free = GaugeMetricFamily(
        "mp_pool_slots_free", "Free slots for a model (heartbeats less what this replica sent since).", labels=["model"]
    )
    queue = GaugeMetricFamily("mp_pool_queue_depth", "Requests queued on the providers of a model.", labels=["model"])
    served = sorted(pool.models().items(), key=lambda item: (-len(item[1]), item[0]))
    rows: dict[str, list[int]] = {}
    for index, (model, states) in enumerate(served):
        row = rows.setdefault(model if index < MAX_MODELS else OTHER, [0, 0, 0, 0])
        row[0] += len(states)
        row[1] += sum(s.heartbeat.slots for s in states)
        row[2] += sum(max(0, s.free_slots()) for s in states)
        row[3] += sum(s.heartbeat.queue_depth for s in states)
    for model, (n, total, available, queued) in rows.items():
        providers.add_metric([model], n)
        slots.add_metric([model], total)
        free.add_metric([model], available)
        queue.add_metric([model], queued)
    connected = _gauge("mp_pool_connected_providers", "Providers in this replica's pool view.", len(pool.providers))
    return [providers, slots, free, queue, connected]


def metering_families(metering: Metering) -> list[Metric]:
    messages, events = metering.published()
    return [
        _gauge(
            "mp_usage_open_reservations",
            "Quota reservations of requests running on this replica (settled when they end).",
            metering.open_count(),
        ),
        _gauge(
            "mp_usage_oldest_open_reservation_seconds",
            "Age of the oldest of them (its gateway reports its progress every few seconds).",
            metering.oldest_open_s(),
        ),
        _gauge(
            "mp_usage_unwritten_events",
            "Messages of usage events in the stream not yet written to Postgres, all replicas' (as of the last"
            " sweep, every few seconds; a loop turn's events share a message): a growing number means the"
            " ledger consumers cannot write.",
            metering.unwritten_events,
        ),
        CounterMetricFamily(
            "mp_usage_event_messages",
            "Messages this replica stored in the usage stream (the events of a loop turn share one).",
            value=messages,
        ),
        CounterMetricFamily("mp_usage_events_published", "Usage events those messages carried.", value=events),
    ]


async def present(state: State) -> list[Metric]:
    """What this app's connections and soft state say now."""
    families: list[Metric] = []
    runtime = state.get("runtime")
    natsauth = state.get("natsauth")
    nats = GaugeMetricFamily("mp_nats_connected", "1 while this NATS connection is up.", labels=["connection"])
    db = None
    if runtime is not None:
        db = runtime.db
        nats.add_metric(["control_plane"], int(runtime.nc.is_connected))
        families += pool_families(runtime.pool)
        families += metering_families(runtime.metering)
    if natsauth is not None:
        db = db or natsauth.db
        nats.add_metric(["callout"], int(natsauth.nc.is_connected))
        if natsauth.sys_nc is not None:
            nats.add_metric(["system"], int(natsauth.sys_nc.is_connected))
    families.append(nats)
    if db is not None:
        families.append(
            _gauge("mp_postgres_reachable", "1 if Postgres answered SELECT 1 within 2 s.", int(await _reachable(db)))
        )
        busy = GaugeMetricFamily("mp_postgres_pool_connections", "This app's Postgres connections.", labels=["state"])
        size, idle = db.get_size(), db.get_idle_size()
        busy.add_metric(["busy"], size - idle)
        busy.add_metric(["idle"], idle)
        families.append(busy)
    lifecycle: Lifecycle | None = state.get(LIFECYCLE)
    if lifecycle is not None:
        families.append(
            _gauge("mp_http_inflight_requests", "HTTP requests running now (streams included).", lifecycle.running)
        )
        families.append(
            _gauge("mp_stopping", "1 once SIGTERM came (readiness fails, requests drain).", int(lifecycle.stopping))
        )
    return families
