"""The local admin API (127.0.0.1): health, status, load, unload, fit (seeds 001 and 002), and Prometheus metrics.

Errors are `{"detail": "..."}` as seed 001 specifies for this API. Behind daemon.http_guard:
loopback Host, no cross-site Origin, JSON only, and the admin token on every route but
/admin/health. Answers carry no secrets: the NATS URL without its credentials, and no file
paths (the model is named by its id).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from prometheus_client import CONTENT_TYPE_LATEST

from daemon import __version__
from daemon.admin.model_folder import ModelFolderRefused, resolve_model_folder
from daemon.admin.status import Status
from daemon.admin.status import status as daemon_status
from daemon.engine.base import EngineError, Unsupported
from daemon.engine.report import gb
from daemon.http_guard import LocalGuard, Refusal
from daemon.metrics import exposition

if TYPE_CHECKING:
    from daemon.runtime import Daemon

# /admin/health stays open (no token): it is what liveness probes and "is it up yet?" loops
# call, it changes nothing and tells only healthy/draining, the worker's state and the
# version. It is still behind the Host/Origin checks, so no web page can read it.
OPEN_PATHS = frozenset({"/admin/health"})


def _detail(status: int, message: str) -> Response[dict[str, str]]:
    return Response({"detail": message}, status_code=status)


def _render_refusal(refusal: Refusal) -> bytes:
    return msgspec.json.encode({"detail": refusal.message})


def create_admin_app(daemon: Daemon) -> LocalGuard:
    """The admin API behind the local guard, requiring daemon.admin_token."""
    return LocalGuard(
        _admin_app(daemon),
        render=_render_refusal,
        token=daemon.admin_token,
        open_paths=OPEN_PATHS,
        body_timeout_s=daemon.settings.body_timeout_s,
    )


def _admin_app(daemon: Daemon) -> Litestar:
    @get("/admin/health")
    async def health() -> Response[dict[str, Any]]:
        worker_status = await daemon.engine.health()
        body = {"status": "draining" if daemon.draining else "healthy", "worker_status": worker_status}
        return Response({**body, "version": __version__})

    @get("/admin/status")
    async def status() -> Status:
        return await daemon_status(daemon)

    @post("/admin/load", status_code=200)
    async def load(model_path: str) -> Response[dict[str, Any]]:
        engine = daemon.engine
        try:
            folder = resolve_model_folder(
                model_path, models_dir=daemon.settings.models_dir, configured=daemon.settings.model_path
            )
        except ModelFolderRefused as exc:
            return _detail(exc.status, exc.message)
        started = time.monotonic()
        try:
            await engine.load(folder)
        except Unsupported as exc:
            return _detail(400, str(exc))
        except EngineError as exc:
            return _detail(500, f"Load failed: {exc.message}")
        model = (await engine.status()).model
        return Response(
            {
                "status": "success",
                "model_name": model.name,
                "memory_gb": model.memory_gb,
                "load_time": round(time.monotonic() - started, 3),
            }
        )

    @post("/admin/unload", status_code=200)
    async def unload() -> Response[dict[str, Any]]:
        started = time.monotonic()
        try:
            model_id, freed = await daemon.engine.unload()
        except Unsupported as exc:
            return _detail(400, str(exc))
        return Response(
            {
                "status": "success",
                "model_name": model_id,
                "memory_freed_gb": gb(freed),
                "unload_time": round(time.monotonic() - started, 3),
            }
        )

    @get("/admin/fit")
    async def fit_report() -> Response[dict[str, Any]]:
        try:
            return Response(daemon.engine.fit(daemon.machine))
        except Unsupported as exc:
            return _detail(400, str(exc))

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
