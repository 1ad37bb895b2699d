"""What a running control-plane process shares between requests: connections and soft state.

Built in the app's lifespan from Settings and stored on `app.state`; nothing
lives at module level, so several apps (and tests) can run in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from litestar import Litestar
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from nats.aio.client import Client as Nats

from schemas import nats_direct, subjects
from schemas.logs import SummaryLines
from schemas.tracing import Tracing, open_tracing
from services.auth.demo import DemoTokens
from services.canary.runner import Canaries, CanarySettings
from services.catalog.catalog import Catalog
from services.catalog.verdicts import Verdicts
from services.db.pool import open_pool
from services.gateway.dispatch import Dispatcher, ReplyRouter
from services.gateway.membership import Membership
from services.gateway.pool import PoolView
from services.keys.lookup import KeyLookup
from services.metrics.registry import Metrics
from services.providers.admission import Admission
from services.providers.violations import Violations
from services.settings import Settings
from services.usage.ledger import UsageStream
from services.usage.metering import Metering

log = structlog.get_logger("services")


@dataclass
class Since:
    at: float = field(default_factory=time.monotonic)

    async def reset(self) -> None:
        # A nats-py callback (a coroutine): heartbeats missed while disconnected left the pool view stale.
        self.at = time.monotonic()


@dataclass
class Runtime:
    settings: Settings
    db: asyncpg.Pool
    nc: Nats
    pool: PoolView
    dispatcher: Dispatcher
    metering: Metering
    started_at: float
    # Key lookups (cache + revocation listener) and demo-token signing, for `authenticate`.
    keys: KeyLookup = field(kw_only=True)
    demo: DemoTokens = field(kw_only=True)
    # When this process last (re)connected to NATS and so began hearing heartbeats again.
    listening: Since = field(kw_only=True)
    # The app's metrics (services/metrics/), and its tracer (None: traces are off).
    metrics: Metrics = field(kw_only=True)
    tracing: Tracing | None = field(kw_only=True, default=None)
    # Each request's summary line, in the format the process logs in (schemas/logs.py).
    summary: SummaryLines | None = field(kw_only=True, default=None)

    def pool_listening_s(self) -> float:
        """How long the pool view has been fed by heartbeats without a break (0 while disconnected)."""
        return time.monotonic() - self.listening.at if self.nc.is_connected else 0.0


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[Runtime]:
    metrics = metrics or Metrics()
    db = await open_pool(settings.database_url, size=settings.db_pool_size, run_migrations=settings.migrate_on_start)
    listening = Since()
    nc = await nats_direct.connect(
        settings.nats_url,
        name=f"mac-provider-gateway-{settings.gateway_id}",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        user=settings.nats_user or None,
        password=settings.nats_password or None,
        # JetStream's answers (the usage-event stream) come back on the only inbox our permissions allow.
        inbox_prefix=subjects.CONTROL_INBOX_PREFIX,
        reconnected_cb=listening.reset,
    )
    pool = PoolView(heartbeat_misses=settings.heartbeat_misses, routing=settings.routing)
    router = ReplyRouter(nc, settings.gateway_id, keepalive_ms=settings.gateway_keepalive_ms)
    admission = Admission(
        db,
        settings.database_url,
        per_minute=settings.provisional_admissions_per_min,
        cache_ttl_s=settings.admission_cache_ttl_s,
    )
    violations = Violations(
        db,
        settings.gateway_id,
        limit=settings.provider_violation_limit,
        window_s=settings.provider_violation_window_s,
    )
    # A bundle of frames that does not decode names no request, only its sender.
    router.on_garbled_bundle = lambda provider_id, detail: violations.record(provider_id, "undecodable_frame", detail)
    catalog = Catalog(db, settings.database_url, uncatalogued=settings.uncatalogued_models)
    verdicts = Verdicts(nc, db)
    membership = Membership(
        nc,
        pool,
        settings.gateway_id,
        admission=admission,
        violations=violations,
        max_slots=settings.provider_max_slots,
        catalog=catalog,
        verdicts=verdicts,
    )
    canaries = (
        Canaries(
            db=db,
            nc=nc,
            router=router,
            pool=pool,
            membership=membership,
            catalog=catalog,
            verdicts=verdicts,
            violations=violations,
            gateway_id=settings.gateway_id,
            settings=CanarySettings(
                join_delay_s=settings.canary_join_delay_s,
                interval_s=settings.canary_interval_s,
                tokens=settings.canary_tokens,
                accept_timeout_s=settings.accept_timeout_s,
                timeout_s=min(settings.request_timeout_s, 60.0),
                deadline_s=settings.request_timeout_s,
            ),
            metrics=metrics,
        )
        if settings.canaries
        else None
    )
    keys = KeyLookup(db, settings)
    demo = DemoTokens(settings.secret_key, ttl_s=settings.demo_token_ttl_s)
    stream = (
        UsageStream(
            nc,
            db,
            settings.gateway_id,
            replicas=settings.usage_stream_replicas,
            linger_s=settings.ledger_linger_ms / 1000,
            idle_s=settings.reservation_stale_s,
            max_bytes=settings.usage_stream_max_mb << 20,
            metrics=metrics,
        )
        if settings.metering and settings.settlement == "jetstream"
        else None
    )
    if stream is not None:
        router.on_final = stream.publisher.flush_soon
    metering = Metering(
        db,
        settings.gateway_id,
        enabled=settings.metering,
        stale_after_s=settings.reservation_stale_s,
        metrics=metrics,
        stream=stream,
    )
    tracing = open_tracing(settings.tracing, service="mac-provider-gateway", instance=settings.gateway_id)
    try:
        await keys.start()
        await metering.start()
        await router.start()
        await admission.start()
        await violations.start()
        # The catalog is read before the first heartbeat is judged against it.
        await catalog.start()
        await verdicts.start()
        await membership.start()
        await listening.reset()
        if canaries is not None:
            await canaries.start()
        dispatcher = Dispatcher(
            nc,
            pool,
            router,
            settings.gateway_id,
            accept_timeout_s=settings.accept_timeout_s,
            stream_idle_timeout_s=settings.stream_idle_timeout_s,
            request_timeout_s=settings.request_timeout_s,
            first_token_timeout_s=settings.first_token_timeout_s,
            lost_after_intervals=settings.lost_after_intervals,
            max_failovers=settings.max_failovers,
            violations=violations,
            metrics=metrics,
            tracing=tracing,
        )
        log.info("control_plane_ready", gateway_id=settings.gateway_id)
        yield Runtime(
            settings,
            db,
            nc,
            pool,
            dispatcher,
            metering,
            time.time(),
            keys=keys,
            demo=demo,
            listening=listening,
            metrics=metrics,
            tracing=tracing,
            summary=SummaryLines("gateway", json=settings.log_json, level=settings.log_level),
        )
    finally:
        if canaries is not None:
            await canaries.stop()
        await keys.stop()
        await metering.stop()
        await membership.stop()
        await verdicts.stop()
        await catalog.stop()
        await admission.stop()
        await violations.stop()
        await router.stop()
        with contextlib.suppress(Exception):
            await nc.drain()
        await db.close()
        if tracing is not None:
            # Off the loop: flushing waits for the exporter.
            await asyncio.to_thread(tracing.shutdown)


def runtime_lifespan(settings: Settings, metrics: Metrics) -> contextlib.AbstractAsyncContextManager[None] | object:
    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_runtime(settings, metrics) as runtime:
            app.state.runtime = runtime
            yield

    return lifespan


def runtime_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Runtime:
    """The app's runtime, for the inference routes: as a dependency it cost them 20-30 us a request
    (Litestar resolves dependencies in a task group of their own). Looked up as an item: as an attribute
    it went through an AttributeError, then State's Python `__getattr__`."""
    runtime: Runtime = connection.app.state["runtime"]
    return runtime


def provide_runtime(state: State) -> Runtime:
    runtime: Runtime = state.runtime
    return runtime
