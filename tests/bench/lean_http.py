"""A lean HTTP/1.1 client for the load: one keep-alive connection per worker, parsed by httptools.

On this 2-core machine the load's client shares the cores with everything it
measures. httpx (h11, httpcore, anyio) spent about 1.1 ms of CPU per 64-token
stream and 0.8-1.0 ms per whole answer: as much as the gateway, NATS or the
daemon, so a gateway's added latency was partly the client waiting for a core
that its own parsing and the relay it measured were taking. Load generators
are kept cheap for that reason (wrk, oha); this one is uvicorn's C parser
(httptools) on an asyncio protocol, and every series, the direct baselines
included, uses it alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

# (bytes of the body as they arrived, time.perf_counter() when they did)
OnBody = Callable[[bytes, float], None]

# uvicorn closes an idle keep-alive connection after 5 s: one idle longer than this is not reused, so a
# request never races the server's close (the same rule as the httpx clients' keepalive_expiry).
KEEPALIVE_S = 4.0


class LeanHttpError(Exception):
    """The connection failed or the answer could not be read."""


class Answer:
    """One response: its status, its x-request-id, and its body (unless it was handed to `on_body`)."""

    __slots__ = ("body", "request_id", "status")

    def __init__(self) -> None:
        self.status = 0
        self.request_id: str | None = None
        self.body = bytearray()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: a request at a time, its response parsed as the bytes arrive."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._done: asyncio.Future[None] | None = None
        self._answer = Answer()
        self._on_body: OnBody | None = None
        self._now = 0.0
        self._header = b""
        self.keep_alive = True
        self.closed = False
        self.used_at = time.monotonic()

    # ---- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)

    def attach(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, though they are one.)
        self._transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self._now = time.perf_counter()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(LeanHttpError(f"bad response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(LeanHttpError(f"connection lost: {exc!r}"))

    # ---- httptools callbacks -----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-request-id":
            self._answer.request_id = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._answer.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self._on_body is not None and self._answer.status == 200:
            self._on_body(body, self._now)
        else:
            self._answer.body += body

    def on_message_complete(self) -> None:
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)

    # ---- the request -------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        done = self._done
        if done is not None and not done.done():
            done.set_exception(exc)

    async def exchange(self, request: bytes, on_body: OnBody | None, timeout_s: float) -> Answer:
        assert self._transport is not None
        self._answer = answer = Answer()
        self._on_body = on_body
        self._done = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        try:
            async with asyncio.timeout(timeout_s):
                await self._done
        finally:
            self._done = None
            self._on_body = None
            self.used_at = time.monotonic()
        return answer

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class LeanClients:
    """One keep-alive connection per worker (a closed loop's worker sends one request at a time)."""

    def __init__(self, *, timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self._connections: dict[tuple[str, int, int], _Connection] = {}

    async def _connection(self, host: str, port: int, worker: int) -> _Connection:
        key = (host, port, worker)
        old = self._connections.get(key)
        if old is not None and not old.closed and old.keep_alive and time.monotonic() - old.used_at < KEEPALIVE_S:
            return old
        if old is not None:
            old.close()
        loop = asyncio.get_running_loop()
        try:
            transport, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, host, port), min(10.0, self.timeout_s)
            )
        except (OSError, TimeoutError) as exc:
            raise LeanHttpError(f"connect failed: {exc!r}") from exc
        # uvloop may call connection_made a loop turn after create_connection returns.
        conn.attach(transport)
        self._connections[key] = conn
        return conn

    async def post(self, worker: int, target: Target, on_body: OnBody | None = None) -> Answer:
        """POST `target`'s body; a 200's body goes to `on_body` as it arrives (when given)."""
        conn = await self._connection(target.host, target.port, worker)
        try:
            answer = await conn.exchange(target.request, on_body, self.timeout_s)
        except BaseException:
            # A request cut off leaves its connection mid-answer: it is never reused.
            conn.close()
            raise
        if not conn.keep_alive:
            conn.close()
        return answer

    async def __aenter__(self) -> LeanClients:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()


class Target:
    """A POST to one URL with one body, its request bytes built once."""

    def __init__(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"the lean client speaks plain http only: {url}")
        self.host = parts.hostname
        self.port = parts.port or 80
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        head = [f"POST {path} HTTP/1.1", f"host: {parts.netloc}", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
