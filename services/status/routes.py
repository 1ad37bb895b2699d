"""Pool status (public), the model list (authenticated) and a health route."""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec
from litestar import Request, Response, get
from litestar.di import NamedDependency

from schemas import openai
from services.auth.bearer import authenticate
from services.auth.declared import Auth, requires
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


@get("/v1/status", **documented(ok=PoolStatus, errors=(500,)), **requires(Auth.PUBLIC))
async def pool_status(runtime: NamedDependency[Runtime]) -> PoolStatus:
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
