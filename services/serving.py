"""uvicorn, with SIGTERM meaning a graceful stop (services/lifecycle.py) rather than an immediate one.

uvicorn alone stops listening the moment SIGTERM arrives, gives running
requests `timeout_graceful_shutdown`, then cancels them without a word, and
re-raises the signal so the process dies of it. Here the first SIGTERM starts
`Lifecycle.stop` (readiness fails, requests drain, overdue streams end with an
in-band error and are settled) and only then lets uvicorn shut down, and the
process exits 0. SIGINT (Ctrl-C) and a second signal keep uvicorn's behaviour.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
from types import FrameType

import structlog
import uvicorn
from litestar import Litestar

from services.gateway.lane import Lane
from services.gateway.sse import ServerSend
from services.http_head import HeadWithBody
from services.lifecycle import LIFECYCLE, Lifecycle
from services.settings import Settings

log = structlog.get_logger("services")

# What uvicorn still waits for after our drain (it has nothing left to wait for but idle connections).
_AFTER_DRAIN_S = 3


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Litestar) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Everything made to start (modules, the app, its routes and schemas, connections, caches) lives
        # as long as the process: out of the collector's sight, a full collection scans what requests
        # made, not the whole heap (each took about 50 ms of CPU, a pause for every request in flight).
        gc.freeze()
        # A request's objects are freed by reference counting; collecting every 700 allocations mostly
        # scanned (and promoted) objects about to be freed anyway. The collector's share of a gateway's
        # CPU in `just bench hotpath`: 8% by default, 4.6% frozen, 2.3% frozen with this threshold.
        gc.set_threshold(10_000, 10, 10)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._loop is None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        # Not recorded as captured: uvicorn would re-raise it at exit and the process would die of it.
        self._loop.call_soon_threadsafe(self._begin_stop)

    def _begin_stop(self) -> None:
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())

    async def _stop(self) -> None:
        lifecycle: Lifecycle = self._app.state[LIFECYCLE]
        try:
            await lifecycle.stop(cut=self._cut)
        except Exception:
            log.exception("shutdown_failed")
        finally:
            self.should_exit = True

    def _cut(self) -> None:
        runtime = self._app.state.get("runtime")
        if runtime is not None:
            runtime.dispatcher.cut()


def served(app: Litestar) -> ServerSend:
    """The ASGI app uvicorn runs: the server's own `send` kept for streams, the inference POSTs in the lane."""
    return ServerSend(Lane(app))


def serve(app: Litestar, settings: Settings) -> None:
    config = uvicorn.Config(
        served(app),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,  # the gateway writes its own summary line per request
        # Named, not "auto": uvicorn[standard] brings both, and a silent fallback to the pure-Python
        # loop and parser would cost every request (both show in a py-spy profile of the gateway).
        loop="uvloop",
        # httptools, with a response's head written together with its first body bytes (services/http_head.py).
        http=HeadWithBody,
        timeout_graceful_shutdown=_AFTER_DRAIN_S,
        timeout_keep_alive=settings.http_keepalive_s,
        # uvicorn would otherwise take X-Forwarded-For / X-Forwarded-Proto from any client on
        # 127.0.0.1 and rewrite the peer address before we see it; MP_TRUSTED_PROXY_HOPS
        # (services/auth/client_ip.py) is the only authority on proxy headers.
        proxy_headers=False,
        # No `server: uvicorn` on every answer: it tells a scanner what to look up, and every buyer's client
        # parses one more header per response for nothing.
        server_header=False,
    )
    _Server(config, app).run()
