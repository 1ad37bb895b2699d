"""uvicorn's httptools protocol, with a response's head sent in the same system call as its first body bytes.

uvicorn writes the status line and headers as soon as the app sends `http.response.start`, then
each body message as a write of its own: two `send()` calls where one would do, and two wake-ups
of the buyer's client (it reads the head, then the body). Here the head waits for the end of the
loop turn: a body sent in the same turn (a whole JSON answer, a stream's first chunk when the
provider's first token came with its acceptance) leaves with it. Nothing waits longer than that
turn: a head whose body is not ready yet goes out alone, as before.

A request's task starts once its body has arrived, not at its headers: an SDK's client (httpx) writes
the two apart, and a task started at the headers waited for the body (a suspension and a wake-up through
its whole chain of coroutines), under a timer against a client that trickles it (`asyncio.timeout`,
uvloop's timer armed and cancelled: 5 us). The task starts at once where it must not wait: a body
past uvicorn's buffer (reading pauses until the app reads), `Expect: 100-continue` (the client waits for
the app's first `receive`), or BODY_GRACE_S after the headers (a slow client: the app's own body
timeout then runs), or when the client leaves first (the app hears of it, and logs the request as
gone). The request is told its body is whole (`BODY_ARRIVED`): its reader needs no timer then.

It also tells a request that its client left (schemas/disconnect.py's `HangUp`,
in the scope) from `connection_lost` itself: no task per answer waiting on
`receive` for uvicorn's `http.disconnect`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from schemas.disconnect import HANG_UP

# The scope key of a callable: True once the request's whole body has arrived (or its client left), so
# that `receive` returns at once, with no wait a slow client could stretch.
BODY_ARRIVED = "mp.body_arrived"
# How long a request's task waits for the rest of its body before starting without it (its reader's
# timeout, services/gateway/requests.py, then counts from there).
BODY_GRACE_S = 0.5


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


class _HangUp:
    """One request's `HangUp` (schemas/disconnect.py): its callback runs when the connection is lost."""

    __slots__ = ("_callback", "_cycle", "_watching")

    def __init__(self, cycle: RequestResponseCycle, watching: set[_HangUp]) -> None:
        self._cycle = cycle
        # The connection's watches, which `connection_lost` calls.
        self._watching = watching
        self._callback: Callable[[], object] | None = None

    def watch(self, callback: Callable[[], object]) -> bool:
        # While the server does not read the connection (a request pipelined behind this one, a large body
        # not read yet), it would not see the client leave; reading `receive` makes it read again.
        if self._cycle.flow.read_paused or self._cycle.disconnected or self._cycle.response_complete:
            return False
        self._callback = callback
        self._watching.add(self)
        return True

    def stop(self) -> None:
        self._callback = None
        self._watching.discard(self)

    def body_arrived(self) -> bool:
        """The scope's BODY_ARRIVED: `receive` would return the whole body (or the hang-up) without waiting."""
        cycle = self._cycle
        return cycle.disconnected or (not cycle.more_body and cycle.message_event.is_set())

    def lost(self) -> None:
        callback = self._callback
        self.stop()
        if callback is not None and not self._cycle.response_complete:
            callback()


class HeadWithBody(HttpToolsProtocol):
    """`http="httptools"`, each request's cycle writing through a `_HeadHeld` and offering a `_HangUp`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watching: set[_HangUp] = set()
        # The request whose task waits for its body (the parser's current cycle), and the timer that
        # starts it anyway after BODY_GRACE_S.
        self._waiting_body: tuple[RequestResponseCycle, Any] | None = None
        self._grace: asyncio.TimerHandle | None = None

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if cycle.more_body and not cycle.waiting_for_100_continue and not cycle.disconnected:
            self._waiting_body = (cycle, app)
            return
        super()._start_asgi_task(cycle, app)

    def _start_waiting(self) -> None:
        waiting, self._waiting_body = self._waiting_body, None
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if waiting is not None:
            super()._start_asgi_task(*waiting)

    def _arm_grace(self) -> None:
        if self._waiting_body is not None and self._grace is None:
            self._grace = self.loop.call_later(BODY_GRACE_S, self._start_waiting)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Armed after the read, not at the headers: a body in the same read needs no timer.
        self._arm_grace()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined request started now may wait for the rest of its body with no read to come.
        self._arm_grace()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self.flow.read_paused:  # the buffer is full: reading resumes only when the app reads
            self._start_waiting()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._start_waiting()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # A request still waiting for its body runs now, to be told its client left (its summary line).
        self._start_waiting()
        # Every request still answering on this connection (a pipelined one's cycle is not `self.cycle`).
        for watch in list(self._watching):
            watch.lost()

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not before:
            # Its task has not run yet (it starts on the next turn), so nothing was written through the
            # connection's transport directly.
            cycle.transport = _HeadHeld(self.transport, self.loop)  # type: ignore[assignment]
            hang_up = _HangUp(cycle, self._watching)
            cycle.scope[HANG_UP] = hang_up  # type: ignore[literal-required]
            cycle.scope[BODY_ARRIVED] = hang_up.body_arrived  # type: ignore[literal-required]
