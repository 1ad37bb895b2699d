"""Pool status (public), the model list (authenticated), and the health and probe routes.

`/health` is a summary for people. The probes are for orchestrators (see
services/lifecycle.py): `/healthz/live` answers while the event loop runs;
`/healthz/ready` says whether this replica should get requests now.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import msgspec
from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.di import NamedDependency

from schemas import openai
from services.auth.bearer import authenticate
from services.auth.declared import Auth, requires
from services.lifecycle import LIFECYCLE, PROBE, Lifecycle
from services.openapi import documented
from services.runtime import Runtime
from services.usage.metering import quota_headers


class ModelStatus(msgspec.Struct, frozen=True):
    id: str
    providers: int
    slots: int
    slots_free: int
    queue_depth: int


class Capacity(msgspec.Struct, frozen=True):
    providers: int
    slots: int
    slots_free: int
    queue_depth: int
    decode_tokens_per_s: float


class PoolStatus(msgspec.Struct, frozen=True):
    status: Literal["available", "unavailable"]
    models: list[ModelStatus]
    capacity: Capacity
    disclosures: list[str]
    object: Literal["status"] = "status"


class Readiness(msgspec.Struct, frozen=True):
    status: Literal["ready", "not_ready"]
    # SIGTERM came: this replica finishes what it runs and takes nothing new.
    stopping: bool
    database: bool
    nats: bool
    # Replicas that route: heartbeats were heard for a heartbeat interval since NATS (re)connected.
    # None where the app does not route.
    pool_warm: bool | None


class Liveness(msgspec.Struct, frozen=True):
    status: Literal["alive"] = "alive"


# A database that takes longer than this to answer `SELECT 1` counts as unreachable.
_DB_CHECK_S = 2.0


class Health(msgspec.Struct, frozen=True):
    status: Literal["ok", "degraded"]
    database: bool
    nats: bool
    providers: int
    uptime_s: float


# Seed 000's tier-1 disclosures, stated wherever we describe the pool.
DISCLOSURES = [
    "Prompts and outputs are processed as plaintext on provider hardware; providers can observe them.",
    (
        "Model identity is provider-reported: the pool checks the weights hash a provider reports against the "
        "operator's catalog and spot-checks its answers with canary prompts, but does not cryptographically "
        "verify the loaded model."
    ),
    "There is no hardware attestation or runtime integrity check on providers.",
]


def current_status(runtime: Runtime) -> PoolStatus:
    """The pool as this replica hears it (also rendered by the /status and / pages)."""
    states = list(runtime.pool.providers.values())
    models = [
        ModelStatus(
            id=model_id,
            providers=len(serving),
            slots=sum(s.heartbeat.slots for s in serving),
            slots_free=sum(max(0, s.free_slots()) for s in serving),
            queue_depth=sum(s.heartbeat.queue_depth for s in serving),
        )
        for model_id, serving in sorted(runtime.pool.models().items())
    ]
    capacity = Capacity(
        providers=len(states),
        slots=sum(s.heartbeat.slots for s in states),
        slots_free=sum(max(0, s.free_slots()) for s in states),
        queue_depth=sum(s.heartbeat.queue_depth for s in states),
        # Measured by this replica where it can; a claim counts only up to a cap until then.
        decode_tokens_per_s=round(sum(s.decode_tps() for s in states), 1),
    )
    return PoolStatus(
        status="available" if states else "unavailable",
        models=models,
        capacity=capacity,
        disclosures=DISCLOSURES,
    )


@get("/v1/status", **documented(ok=PoolStatus, errors=(500,)), **requires(Auth.PUBLIC))
async def pool_status(runtime: NamedDependency[Runtime]) -> PoolStatus:
    return current_status(runtime)


@get("/v1/models", **documented(ok=openai.ModelList, errors=(401, 403, 429, 500)), **requires(Auth.API_KEY_OR_DEMO))
async def list_models(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[openai.ModelList]:
    principal = await authenticate(request, runtime, allow_demo=True)
    now = int(time.time())
    models = openai.ModelList(
        data=[openai.Model(id=m, created=now, owned_by="mac-provider-pool") for m in sorted(runtime.pool.models())]
    )
    return Response(models, headers=await quota_headers(runtime.db, principal, runtime.settings))


@get("/health", **documented(ok=Health, errors=(503,), error_body=Health), **requires(Auth.PUBLIC))
async def health(runtime: NamedDependency[Runtime]) -> Response[Health]:
    try:
        database = await runtime.db.fetchval("SELECT 1") == 1
    except Exception:
        database = False
    nats_ok = runtime.nc.is_connected
    ok = database and nats_ok
    body = Health(
        status="ok" if ok else "degraded",
        database=database,
        nats=nats_ok,
        providers=len(runtime.pool.providers),
        uptime_s=round(time.time() - runtime.started_at, 1),
    )
    return Response(body, status_code=200 if ok else 503)


# Probes: public (an orchestrator has no key), never counted as requests nor refused while stopping.
_PROBE: dict[str, Any] = {"include_in_schema": False, "opt": {**requires(Auth.PUBLIC)["opt"], PROBE: True}}


@get("/healthz/live", **_PROBE)
async def live() -> Liveness:
    """Answers while the event loop does: what a liveness probe asks, nothing more (no restart for a lost database)."""
    return Liveness()


def _backends(state: State) -> tuple[Any, list[Any]] | None:
    """(the database pool, the NATS connections) this app runs on, whichever kind of app it is."""
    runtime: Runtime | None = state.get("runtime")
    if runtime is not None:
        return runtime.db, [runtime.nc]
    # The NATS auth callout run alone (`serve --service natsauth`): its own pool and logins.
    natsauth = state.get("natsauth")
    if natsauth is not None:
        return natsauth.db, [c for c in (natsauth.nc, getattr(natsauth, "sys_nc", None)) if c is not None]
    return None


@get("/healthz/ready", **_PROBE)
async def ready(request: Request[Any, Any, Any]) -> Response[Readiness]:
    lifecycle: Lifecycle = request.app.state[LIFECYCLE]
    # Looked up rather than injected: an app still starting, or of another kind, answers "not ready", never a 500.
    backends = _backends(request.app.state)
    database = nats_ok = False
    if backends is not None:
        db, connections = backends
        try:
            async with asyncio.timeout(_DB_CHECK_S):
                database = await db.fetchval("SELECT 1") == 1
        except Exception:
            database = False
        nats_ok = all(c.is_connected for c in connections)
    warm: bool | None = None
    if lifecycle.routes:
        runtime: Runtime | None = request.app.state.get("runtime")
        warm = runtime is not None and runtime.pool_listening_s() >= runtime.settings.pool_warmup_s
    ok = not lifecycle.stopping and database and nats_ok and warm is not False
    body = Readiness(
        status="ready" if ok else "not_ready",
        stopping=lifecycle.stopping,
        database=database,
        nats=nats_ok,
        pool_warm=warm,
    )
    return Response(body, status_code=200 if ok else 503)
