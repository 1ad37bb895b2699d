"""Local HTTP listeners (admin API, OpenAI-compatible API) inside the daemon's event loop.

Both bind 127.0.0.1 only: they are for the owner of the Mac, never the network. That
does not keep out the browser on the same Mac: each app comes wrapped in
daemon.http_guard.LocalGuard (loopback Host, no cross-site Origin, JSON only, admin token).
uvicorn would install its own SIGTERM/SIGINT handlers; the daemon owns those
(it drains before it exits), so they are turned off here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any

import structlog
import uvicorn

log = structlog.get_logger("daemon.http")

HOST = "127.0.0.1"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class LocalServer:
    def __init__(self, name: str, app: Any, port: int) -> None:
        self.name = name
        self.port = port
        config = uvicorn.Config(
            app,
            host=HOST,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            # Nothing proxies these listeners: X-Forwarded-* from a local client must not count.
            proxy_headers=False,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> bool:
        """Listen; False (logged) when the port cannot be bound: the pool work goes on without it."""
        # We bind the socket ourselves: uvicorn answers a bind error with sys.exit(), which
        # would take the whole daemon down with it.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, self.port))
        except OSError as exc:
            sock.close()
            log.error("local_http_failed", listener=self.name, port=self.port, error=str(exc))
            return False
        # Accepted connections inherit it: without it a response's second write (uvicorn sends the
        # headers and the body apart) waits for the client's delayed ACK, 40 ms a request on Linux.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(128)
        sock.setblocking(False)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=f"http-{self.name}")
        while not self._server.started and not self._task.done():  # noqa: ASYNC110 - uvicorn has no ready event
            await asyncio.sleep(0.01)
        log.info("local_http_listening", listener=self.name, url=f"http://{HOST}:{self.port}")
        return True

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self._task, 10)
        self._task = None
