"""/health of a process that runs the auth callout alone (`serve --service natsauth`)."""

from __future__ import annotations

import time

from litestar import Response, get
from litestar.datastructures import State

from services.auth.declared import Auth, requires
from services.natsauth.service import NatsAuth
from services.status.routes import Health


@get("/health", include_in_schema=False, **requires(Auth.PUBLIC))
async def natsauth_health(state: State) -> Response[Health]:
    natsauth: NatsAuth = state.natsauth
    try:
        database = await natsauth.db.fetchval("SELECT 1") == 1
    except Exception:
        database = False
    nats_ok = natsauth.nc.is_connected and (natsauth.sys_nc is None or natsauth.sys_nc.is_connected)
    ok = database and nats_ok
    body = Health(
        status="ok" if ok else "degraded",
        database=database,
        nats=nats_ok,
        providers=0,
        uptime_s=round(time.time() - natsauth.started_at, 1),
    )
    return Response(body, status_code=200 if ok else 503)
