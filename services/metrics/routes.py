"""GET /metrics on every control-plane app (who may read it: services/metrics/scrape.py)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST

from services.auth.declared import Auth, requires
from services.lifecycle import PROBE
from services.metrics.scrape import METRICS, exposition, present


@get(
    "/metrics",
    include_in_schema=False,
    # Also a probe for the lifecycle: scraped, never refused, while the replica drains.
    opt={**requires(Auth.METRICS)["opt"], PROBE: True},
)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    state = request.app.state
    body = exposition(state[METRICS], await present(state))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
