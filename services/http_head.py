"""uvicorn's httptools protocol, with a response's head sent in the same system call as its first body bytes.

uvicorn writes the status line and headers as soon as the app sends `http.response.start`, then
each body message as a write of its own: two `send()` calls where one would do, and two wake-ups
of the buyer's client (it reads the head, then the body). Here the head waits for the end of the
loop turn: a body sent in the same turn (a whole JSON answer, a stream's first chunk when the
provider's first token came with its acceptance) leaves with it. Nothing waits longer than that
turn: a head whose body is not ready yet goes out alone, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _HeadHeld:
    """The connection's transport, as a response's cycle sees it: its first write waits for the turn's end."""

    __slots__ = ("_first", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._first = True
        # The head, while it waits for the turn's end.
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
            self._transport.write(data)
        elif self._first:
            self._first = False
            self._held = bytes(data)
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():  # the buyer left meanwhile
                self._transport.write(held)

    def close(self) -> None:
        # uvicorn closes after a response on a connection not kept alive: the head must go first.
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        # is_closing, get_extra_info, pause_reading, ...: the connection's own.
        return getattr(self._transport, name)


class HeadWithBody(HttpToolsProtocol):
    """`http="httptools"`, each request's cycle writing through a `_HeadHeld`."""

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not before:
            # Its task has not run yet (it starts on the next turn), so nothing was written through the
            # connection's transport directly.
            cycle.transport = _HeadHeld(self.transport, self.loop)  # type: ignore[assignment]
