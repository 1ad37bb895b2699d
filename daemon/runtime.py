"""The daemon process: engine, pool connection and local HTTP, started and stopped in order.

On SIGTERM (launchd, systemd, `brew services stop`) it stops taking work, lets
in-flight requests finish for up to `drain_timeout_s` (then fails the rest
cleanly), leaves the pool, stops the worker and exits, all before launchd's
20 s kill.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field

import structlog

from daemon.engine.base import Engine
from daemon.http import LocalServer
from daemon.machine import Machine, detect
from daemon.metrics import DaemonMetrics
from daemon.provider import Provider
from daemon.settings import DaemonSettings
from schemas.tracing import open_tracing

log = structlog.get_logger("daemon")


def build_engine(settings: DaemonSettings, machine: Machine) -> Engine:
    if settings.engine == "synthetic":
        from daemon.engine.synthetic import SyntheticEngine

        return SyntheticEngine(
            settings.model_id,
            token_delay_s=settings.synthetic_token_delay_s,
            tokens_per_step=settings.synthetic_tokens_per_step,
            slots=settings.synthetic_slots,
        )
    from daemon.engine.fit import default_budget
    from daemon.engine.worker_engine import WorkerEngine
    from daemon.models.identity import WeightsHasher
    from daemon.worker.supervisor import WorkerConfig

    config = WorkerConfig(
        slots=settings.slots,
        prefill_step=settings.prefill_step,
        prefill_gather=settings.prefill_gather,
        cache_entries=settings.prompt_cache_entries,
        cache_bytes=settings.prompt_cache_bytes,
        start_timeout_s=settings.worker_start_timeout_s,
        stall_s=settings.worker_stall_s,
        idle_unload_s=settings.idle_unload_s,
        log_json=settings.log_json,
        log_level=settings.log_level,
    )
    return WorkerEngine(
        config=config,
        queue_limit=settings.queue_limit,
        memory_budget_bytes=settings.memory_budget_bytes or default_budget(machine.ram_bytes),
        default_model_id=(settings.model_path, settings.model_id) if settings.model_path else None,
        prepare_helpers=settings.prepare_helpers,
        prepare_timeout_s=settings.prepare_timeout_s,
        hasher=WeightsHasher(settings.state_dir),
    )


@dataclass
class Daemon:
    settings: DaemonSettings
    engine: Engine
    machine: Machine
    provider: Provider
    started_at: float = field(default_factory=time.time)
    listening: dict[str, int] = field(default_factory=dict)
    # The admin API's bearer token (daemon.admin.token); None when the admin API is off.
    admin_token: str | None = field(default=None, repr=False)
    # What /metrics on the admin port shows (daemon/metrics.py).
    metrics: DaemonMetrics = field(default_factory=DaemonMetrics, repr=False)

    @property
    def draining(self) -> bool:
        return self.provider.draining

    def pool_connected(self) -> bool:
        nc = self.provider._nc
        return nc is not None and nc.is_connected

    def bundles(self) -> tuple[int, int]:
        """(bundles sent, frames they carried) since start: frames that did not each cost a message."""
        outbox = self.provider._outbox
        return (outbox.bundles, outbox.bundled_frames) if outbox is not None else (0, 0)


async def _wait_idle(engine: Engine, timeout: float) -> None:  # noqa: ASYNC109 - bounded drain
    deadline = time.monotonic() + timeout
    while engine.running() + engine.queued() > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - polls counts
        await asyncio.sleep(0.05)


async def serve(settings: DaemonSettings) -> None:
    """Run until SIGINT/SIGTERM; AdminTokenError (before anything starts) if the token file is unusable."""
    from daemon.admin.app import create_admin_app
    from daemon.admin.token import ensure_admin_token
    from daemon.api.app import create_api_app
    from daemon.engine.base import EngineError

    admin_token = ensure_admin_token(settings.admin_token_file) if settings.admin_port else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    machine = detect()
    engine = build_engine(settings, machine)
    metrics = DaemonMetrics()
    tracing = open_tracing(settings.tracing, service="mac-provider-daemon", instance=settings.provider_id)
    provider = Provider(settings, engine, metrics=metrics, tracing=tracing)
    daemon = Daemon(settings, engine, machine, provider, admin_token=admin_token, metrics=metrics)
    servers = []
    for name, port, factory in (
        ("admin", settings.admin_port, create_admin_app),
        ("api", settings.api_port, create_api_app),
    ):
        if port:
            server = LocalServer(name, factory(daemon), port)
            if await server.start():
                servers.append(server)
                daemon.listening[name] = port
    try:
        await engine.start()
    except EngineError as exc:
        # Keep running without a model: the owner can fix the path and POST /admin/load.
        log.error("model_load_failed", error=exc.message)
    try:
        await daemon.provider.run(stop)
        # Local API requests drain too, within what is left of the drain time.
        await _wait_idle(engine, settings.drain_timeout_s / 2)
    finally:
        for server in servers:
            await server.stop()
        await engine.close()
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)
        log.info("daemon_stopped")
