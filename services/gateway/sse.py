"""A server-sent-event answer written straight to the ASGI server.

Litestar's `Stream` runs every answer in an anyio task group, with a second
task to listen for the client's disconnect, and sends each chunk through its
generic response machinery: on a 64-token stream that was more CPU than
rendering the chunks, and the first chunk waited a loop turn for the new task.
Here the request's own task writes the chunks; the disconnect watcher is one
future whose callback cancels that task, which is what a buyer hanging up
must do (the answer's generator then cancels the provider and settles).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from litestar import Response
from litestar.types import ASGIApp, Receive, Scope, Send

from schemas.disconnect import on_hang_up

MEDIA_TYPE = b"text/event-stream; charset=utf-8"
# Where `ServerSend` keeps the ASGI server's own `send` in the scope.
SERVER_SEND = "mp.server_send"


class ServerSend:
    """The app, with the ASGI server's own `send` kept in each HTTP scope.

    The app's `before_send` hooks (request id, connection close while stopping, response counts) and
    Litestar's wrappers act on a response's start only, yet every message passes through all of them:
    on a streamed answer that is a few coroutine calls per chunk. An `EventStream` sends its start
    through them and its chunks straight to the server. (A middleware that rewrote bodies, such as
    compression, would therefore not see them: SSE must not be buffered or compressed anyway.)
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[SERVER_SEND] = send  # type: ignore[literal-required]
        await self.app(scope, receive, send)


class Last(bytes):
    """An answer's final bytes: they leave in the same write as the response's end."""

    __slots__ = ()


class EventStream(Response[None]):
    """A 200 answer whose body is `chunks`, each sent as soon as it is produced."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], headers: Mapping[str, str]) -> None:
        super().__init__(content=None)
        self._chunks = chunks
        self._raw_headers = [(b"content-type", MEDIA_TYPE)]
        self._raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIApp:  # type: ignore[override]
        # The answer is its own ASGI app: no conversion, no per-chunk wrapping.
        return self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._raw_headers})
        # The chunks skip the app's send hooks (all of them look at the start only), when it can.
        send = scope.get(SERVER_SEND, send)  # type: ignore[assignment]
        task = asyncio.current_task()
        assert task is not None
        hung_up = False

        def hang_up() -> None:
            # Not called once `stop_watching` ran.
            nonlocal hung_up
            hung_up = True
            task.cancel()

        stop_watching = on_hang_up(scope, receive, hang_up)
        try:
            ended = False
            async with contextlib.aclosing(self._chunks) as chunks:
                async for chunk in chunks:
                    ended = type(chunk) is Last
                    await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # The buyer left: the chunks' generator was closed (it cancels and settles); nothing to send.
            if hung_up and task.uncancel() == 0:
                return
            raise
        finally:
            stop_watching()
