"""`/admin/status`: what the daemon says about itself to its owner, as declared wire types.

No secrets (the NATS URL without its credentials) and no file paths (the model is named by its id).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec
from msgspec import UNSET, UnsetType

from daemon import __version__
from daemon.engine.report import (
    AdmissionStatus,
    BatchStatus,
    ModelStatus,
    PromptCacheStatus,
    WorkerStatus,
    gb,
)

if TYPE_CHECKING:
    from daemon.runtime import Daemon


class Ports(msgspec.Struct, frozen=True):
    main: int | None
    admin: int | None


class PoolModel(msgspec.Struct, frozen=True):
    """How the pool sees one model (routed, or why not), as the control plane last said."""

    id: str
    status: str
    routed: bool
    weights_sha256: str
    detail: str
    at: float


class Pool(msgspec.Struct, frozen=True):
    provider_id: str
    # The URL can hold the provider's NATS user and password: shown without them.
    nats_url: str
    connected: bool
    draining: bool
    served: int
    models: list[PoolModel]


class Requests(msgspec.Struct, frozen=True):
    in_flight: int
    running: int
    queued: int


class Config(msgspec.Struct, frozen=True, omit_defaults=True):
    machine_type: str
    chip: str
    total_ram_gb: float
    idle_timeout_seconds: float
    slots: int
    queue_limit: int
    engine: str
    memory_budget_bytes: int | UnsetType = UNSET


class Status(msgspec.Struct, frozen=True, omit_defaults=True):
    status: str
    version: str
    uptime_s: float
    ports: Ports
    pool: Pool
    requests: Requests
    config: Config
    model: ModelStatus
    worker: WorkerStatus
    admission: AdmissionStatus | UnsetType | None = UNSET
    batch: BatchStatus | UnsetType = UNSET
    prompt_cache: PromptCacheStatus | UnsetType | None = UNSET


def _machine_type(ram_bytes: int) -> str:
    gb_ = ram_bytes / (1 << 30)
    return "high-memory" if gb_ >= 64 else "standard" if gb_ >= 16 else "low-memory"


def _pool_models(daemon: Daemon) -> list[PoolModel]:
    notice = daemon.provider.pool_notice
    if notice is None:
        return []
    at = round(daemon.provider.pool_notice_at, 3)
    return [PoolModel(m.model, m.status, m.routed, m.weights_sha256, m.detail, at) for m in notice.models]


async def status(daemon: Daemon) -> Status:
    s = daemon.settings
    engine = daemon.engine
    own = await engine.status()
    return Status(
        status="draining" if daemon.draining else "running",
        version=__version__,
        uptime_s=round(time.time() - daemon.started_at, 1),
        ports=Ports(main=daemon.listening.get("api"), admin=daemon.listening.get("admin")),
        pool=Pool(
            provider_id=s.provider_id,
            nats_url=s.nats_url_redacted,
            connected=daemon.pool_connected(),
            draining=daemon.draining,
            served=daemon.provider.served,
            models=_pool_models(daemon),
        ),
        requests=Requests(
            in_flight=engine.running() + engine.queued(), running=engine.running(), queued=engine.queued()
        ),
        config=Config(
            machine_type=_machine_type(daemon.machine.ram_bytes),
            chip=daemon.machine.chip,
            total_ram_gb=gb(daemon.machine.ram_bytes),
            idle_timeout_seconds=s.idle_unload_s,
            slots=engine.slots,
            queue_limit=s.queue_limit,
            engine=s.engine,
            memory_budget_bytes=own.memory_budget_bytes,
        ),
        model=own.model,
        worker=own.worker,
        admission=own.admission,
        batch=own.batch,
        prompt_cache=own.prompt_cache,
    )
