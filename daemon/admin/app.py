"""The local admin API (127.0.0.1): health, status, load, unload, fit (seeds 001 and 002), and Prometheus metrics.

Errors are `{"detail": "..."}` as seed 001 specifies for this API. Behind daemon.http_guard:
loopback Host, no cross-site Origin, JSON only, and the admin token on every route but
/admin/health. Answers carry no secrets: the NATS URL without its credentials, and no file
paths (the model is named by its id).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from prometheus_client import CONTENT_TYPE_LATEST

from daemon import __version__
from daemon.admin.model_folder import ModelFolderRefused, resolve_model_folder
from daemon.engine import fit
from daemon.engine.base import EngineError
from daemon.http_guard import LocalGuard, Refusal
from daemon.metrics import exposition

if TYPE_CHECKING:
    from daemon.engine.worker_engine import WorkerEngine
    from daemon.runtime import Daemon

GB = 1 << 30

# The worker states seed 001 names, from the supervisor's finer ones.
_HEALTH_STATUS = {
    "healthy": "healthy",
    "no_worker": "no_worker",
    "idle": "no_worker",
    "starting": "starting",
    "restarting": "dead",
    "dead": "dead",
    "stopping": "no_worker",
}


# /admin/health stays open (no token): it is what liveness probes and "is it up yet?" loops
# call, it changes nothing and tells only healthy/draining, the worker's state and the
# version. It is still behind the Host/Origin checks, so no web page can read it.
OPEN_PATHS = frozenset({"/admin/health"})

_ABSOLUTE_PATH = re.compile(r"(?<![\w/.~])/[^\s'\"():,]+")


def _detail(status: int, message: str) -> Response[dict[str, str]]:
    return Response({"detail": message}, status_code=status)


def _render_refusal(refusal: Refusal) -> bytes:
    return msgspec.json.encode({"detail": refusal.message})


def _without_paths(text: str | None, model_path: str | None, model_id: str | None) -> str | None:
    """A worker crash reason as shown in /admin/status: the model folder named by its id, no other paths."""
    if text is None:
        return None
    if model_path and model_id:
        text = text.replace(model_path, model_id)
    return _ABSOLUTE_PATH.sub("<path>", text)


def _worker_engine(daemon: Daemon) -> WorkerEngine | None:
    from daemon.engine.worker_engine import WorkerEngine

    return daemon.engine if isinstance(daemon.engine, WorkerEngine) else None


def _machine_type(ram_bytes: int) -> str:
    gb = ram_bytes / GB
    return "high-memory" if gb >= 64 else "standard" if gb >= 16 else "low-memory"


def _gb(n: int) -> float:
    return round(n / GB, 3)


def _identity(w: WorkerEngine) -> dict[str, Any] | None:
    """The loaded model's SHA-256 identity and what computing it cost (None while hashing)."""
    identity = w.identity
    if identity is None:
        return None
    return {
        "weights_sha256": identity.sha256,
        "files": identity.files,
        "bytes_total": identity.bytes_total,
        # 0 when every file's digest came from the cache (daemon/models/identity.py).
        "bytes_hashed": identity.bytes_hashed,
        "files_from_cache": identity.files_from_cache,
        "seconds": identity.seconds,
    }


def _pool_models(daemon: Daemon) -> list[dict[str, Any]]:
    notice = daemon.provider.pool_notice
    if notice is None:
        return []
    at = round(daemon.provider.pool_notice_at, 3)
    return [
        {
            "id": m.model,
            "status": m.status,
            "routed": m.routed,
            "weights_sha256": m.weights_sha256,
            "detail": m.detail,
            "at": at,
        }
        for m in notice.models
    ]


def create_admin_app(daemon: Daemon) -> LocalGuard:
    """The admin API behind the local guard, requiring daemon.admin_token."""
    return LocalGuard(_admin_app(daemon), render=_render_refusal, token=daemon.admin_token, open_paths=OPEN_PATHS)


def _admin_app(daemon: Daemon) -> Litestar:
    @get("/admin/health")
    async def health() -> Response[dict[str, Any]]:
        engine = _worker_engine(daemon)
        if engine is None:
            worker_status = "healthy"
        else:
            worker_status = _HEALTH_STATUS.get(engine.supervisor.health, engine.supervisor.health)
            if worker_status == "healthy" and await engine.supervisor.ping(timeout=5.0) is None:
                # Alive but not answering: as good as dead for a buyer.
                worker_status = "dead"
        body = {"status": "draining" if daemon.draining else "healthy", "worker_status": worker_status}
        return Response({**body, "version": __version__})

    @get("/admin/status")
    async def status() -> dict[str, Any]:
        s = daemon.settings
        engine = daemon.engine
        body: dict[str, Any] = {
            "status": "draining" if daemon.draining else "running",
            "version": __version__,
            "uptime_s": round(time.time() - daemon.started_at, 1),
            "ports": {"main": daemon.listening.get("api"), "admin": daemon.listening.get("admin")},
            "pool": {
                "provider_id": s.provider_id,
                # The URL can hold the provider's NATS user and password.
                "nats_url": s.nats_url_redacted,
                "connected": daemon.pool_connected(),
                "draining": daemon.draining,
                "served": daemon.provider.served,
                # How the pool sees each model (routed, or why not), as the control plane last said.
                "models": _pool_models(daemon),
            },
            "requests": {
                "in_flight": engine.running() + engine.queued(),
                "running": engine.running(),
                "queued": engine.queued(),
            },
            "config": {
                "machine_type": _machine_type(daemon.machine.ram_bytes),
                "chip": daemon.machine.chip,
                "total_ram_gb": _gb(daemon.machine.ram_bytes),
                "idle_timeout_seconds": s.idle_unload_s,
                "slots": engine.slots,
                "queue_limit": s.queue_limit,
                "engine": s.engine,
            },
        }
        w = _worker_engine(daemon)
        if w is None:
            body["model"] = {"loaded": True, "name": engine.model_id, "memory_gb": 0.0}
            body["worker"] = {"healthy": True, "status": "healthy"}
            return body
        sup = w.supervisor
        stats = await sup.ping(timeout=2.0)
        model = w.model
        info = sup.info
        rss = sup.rss()
        body["model"] = {
            "loaded": model is not None and sup.state == "healthy",
            "name": model.model_id if model else None,
            # Unloaded for idleness: the next request reloads it.
            "idle_unloaded": model is not None and sup.state == "idle",
            "memory_gb": _gb(stats.memory_active if stats and stats.memory_active else rss),
            "weights_gb": _gb(info.weights_bytes) if info and model else None,
            # response_format json_object / json_schema can be constrained (llguidance read the tokenizer).
            "structured_output": w.structured_output(),
            "identity": _identity(w),
        }
        body["worker"] = {
            "healthy": sup.state == "healthy" and stats is not None,
            "status": _HEALTH_STATUS.get(sup.health, sup.health),
            "state": sup.health,
            "pid": sup.pid,
            "rss_bytes": rss,
            "restarts": sup.restarts,
            "last_crash": _without_paths(
                sup.last_crash, str(model.path) if model else None, model.model_id if model else None
            ),
            "idle_for_s": round(time.monotonic() - sup.last_active, 1),
        }
        adm = w.admission()
        body["config"]["memory_budget_bytes"] = w.memory_budget_bytes
        body["admission"] = (
            {
                "max_safe_context": adm.max_safe_context,
                "memory_budget_bytes": adm.budget_bytes,
                "usable_bytes": adm.usable_bytes,
                "weights_bytes": adm.weights_bytes,
                "kv_bytes_per_token": adm.kv_bytes_per_token,
            }
            if adm
            else None
        )
        body["batch"] = {
            "slots": w.slots,
            "active_rows": stats.active if stats else 0,
            "waiting": stats.waiting if stats else 0,
            "decode_tps": round(w.decode_tps(), 2),
            # Since the worker started: tokens generated, steps that decoded them, most rows in one step.
            "generated_tokens": stats.generated_tokens if stats else 0,
            "decode_steps": stats.decode_steps if stats else 0,
            "peak_rows": stats.peak_rows if stats else 0,
        }
        body["prompt_cache"] = (
            {
                "entries": stats.prompt_cache_entries,
                "bytes": stats.prompt_cache_bytes,
                "max_bytes": w.config.cache_bytes,
                "hits": stats.prompt_cache_hits,
                "misses": stats.prompt_cache_misses,
            }
            if stats
            else None
        )
        return body

    @post("/admin/load", status_code=200)
    async def load(model_path: str) -> Response[dict[str, Any]]:
        w = _worker_engine(daemon)
        if w is None:
            return _detail(400, "The synthetic engine has no model to load")
        try:
            folder = resolve_model_folder(
                model_path, models_dir=daemon.settings.models_dir, configured=daemon.settings.model_path
            )
        except ModelFolderRefused as exc:
            return _detail(exc.status, exc.message)
        started = time.monotonic()
        try:
            await w.load(folder)
        except EngineError as exc:
            return _detail(500, f"Load failed: {exc.message}")
        model = w.model
        assert model is not None
        stats = await w.supervisor.ping(timeout=5.0)
        memory = stats.memory_active if stats and stats.memory_active else w.supervisor.rss()
        return Response(
            {
                "status": "success",
                "model_name": model.model_id,
                "memory_gb": _gb(memory),
                "load_time": round(time.monotonic() - started, 3),
            }
        )

    @post("/admin/unload", status_code=200)
    async def unload() -> Response[dict[str, Any]]:
        w = _worker_engine(daemon)
        if w is None or w.model is None:
            return _detail(400, "No model loaded")
        started = time.monotonic()
        model_id, freed = await w.unload()
        return Response(
            {
                "status": "success",
                "model_name": model_id,
                "memory_freed_gb": _gb(freed),
                "unload_time": round(time.monotonic() - started, 3),
            }
        )

    @get("/admin/fit")
    async def fit_report() -> Response[dict[str, Any]]:
        w = _worker_engine(daemon)
        if w is None or w.model is None:
            return _detail(400, "No model loaded")
        info = w.supervisor.info
        measured = info.kv_bytes_per_token if info and info.kv_bytes_per_token else None
        report = fit.assess(w.model.footprint, daemon.machine, w.memory_budget_bytes, kv_bytes_per_token=measured)
        return Response({"model": w.model.model_id, **report, "measured_decode_tps": w.decode_tps() or None})

    @get("/metrics")
    async def metrics() -> Response[bytes]:
        # Behind the admin token like every route but /admin/health: a local Prometheus reads the
        # token file (README, "Metrics and traces"); a web page or another user's process cannot.
        return Response(await exposition(daemon), media_type=CONTENT_TYPE_LATEST)

    def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, str]]:
        return _detail(exc.status_code, str(exc.detail))

    return Litestar(
        route_handlers=[health, status, load, unload, fit_report, metrics],
        exception_handlers={HTTPException: on_http_error},
        openapi_config=None,
        logging_config=None,
    )
