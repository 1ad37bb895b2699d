"""A replica's life after start: whether it should get traffic, and how it stops without cutting a stream.

A load balancer (Kubernetes included) sends a replica requests while its
`/healthz/ready` answers 200 (services/status/routes.py). On SIGTERM
(services/serving.py calls `stop`) the replica:

1. fails readiness at once, and asks every client to close its connection
   after the response in hand (`Connection: close`), so none reuses it;
2. still takes requests for `shutdown_delay_s`, while load balancers catch up
   (Kubernetes removes a terminating pod from its endpoints a little later);
3. then refuses new requests (503 `coordinator_unavailable`, `Retry-After`:
   another replica takes them) and waits for the running ones, streams
   included, up to `shutdown_grace_s`;
4. past that bound, cuts the streams still running: each ends with the
   protocol's in-band error and is settled like any broken stream (the
   tokens it delivered are billed once, services/gateway/pipeline.py);
5. returns, and the server exits.

However a request ends, it is settled before the process exits, so the ledger
holds each request exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from litestar import Litestar
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from services.errors import ShuttingDown
from services.settings import Settings

log = structlog.get_logger("lifecycle")

# State key of the app's Lifecycle, and the route option that marks a probe (never counted or refused).
LIFECYCLE = "lifecycle"
PROBE = "probe"
# After the cut, how long the cut streams get to write their error and settle.
CUT_WAIT_S = 5.0


class Lifecycle:
    def __init__(self, *, delay_s: float, grace_s: float, routes: bool) -> None:
        self.delay_s = delay_s
        self.grace_s = grace_s
        # The app routes requests to providers (so readiness waits for a warm pool view).
        self.routes = routes
        # SIGTERM came: readiness fails.
        self.stopping = False
        # The delay is over: new requests are refused.
        self.refusing = False
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @classmethod
    def for_app(cls, settings: Settings, services: set[str]) -> Lifecycle:
        return cls(
            delay_s=settings.shutdown_delay_s,
            grace_s=settings.shutdown_grace_s,
            routes=bool(services & {"gateway", "status"}),
        )

    @property
    def running(self) -> int:
        return self._running

    def admit(self) -> None:
        """Count a new request in, or refuse it (ShuttingDown) once the replica stopped taking them."""
        if self.refusing:
            raise ShuttingDown(
                "This replica is shutting down and takes no new requests; retry and another replica will answer.",
                headers={"retry-after": "1", "connection": "close"},
            )
        self._running += 1
        self._idle.clear()

    def done(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    async def _idle_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._idle.wait()
        return self._idle.is_set()

    async def stop(self, cut: Callable[[], None]) -> bool:
        """Steps 1-4 above; True if every request finished within the grace, False if some were cut."""
        self.stopping = True
        log.info("shutdown_started", running=self._running, delay_s=self.delay_s, grace_s=self.grace_s)
        await asyncio.sleep(self.delay_s)
        self.refusing = True
        if await self._idle_within(self.grace_s):
            log.info("shutdown_drained")
            return True
        log.warning("shutdown_grace_exceeded", cutting=self._running)
        cut()
        if not await self._idle_within(CUT_WAIT_S):
            log.error("shutdown_requests_left", running=self._running)
        return False


class CountRequests(ASGIMiddleware):
    """Every HTTP request but the probes passes through `Lifecycle.admit` and is counted until its answer ends.

    A stream counts until its last byte is sent. A refusal is raised here and
    answered by the app's one exception handler, in the surface's error shape.
    """

    scopes = (ScopeType.HTTP,)
    exclude_opt_key = PROBE

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        self._lifecycle.admit()
        try:
            await next_app(scope, receive, send)
        finally:
            self._lifecycle.done()


async def close_when_stopping(message: Message, scope: Scope) -> None:
    """A `before_send` hook: once stopping, no connection is kept alive for another request."""
    if message["type"] == "http.response.start":
        lifecycle: Lifecycle | None = Litestar.from_scope(scope).state.get(LIFECYCLE)
        if lifecycle is not None and lifecycle.stopping:
            MutableScopeHeaders.from_message(message)["connection"] = "close"
