"""The client-disconnect watcher of an answer, for the gateway and the daemon's local API.

ASGI only (the server's `receive`), no web framework: the request's body has been
read, so the next message the server delivers is the client's `http.disconnect`.

A server may also offer, under the scope's `HANG_UP` key, a `HangUp`: the same
notice from the connection itself, without a task waiting on `receive` (the
gateway's HTTP protocol does: services/http_head.py). That task was 1.5% of the
gateway's instructions on a non-stream request: it is made, stepped, cancelled
and stepped again for every answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

Receive = Callable[[], Awaitable[Mapping[str, Any]]]

# The scope key of the server's `HangUp` for the request, where it offers one.
HANG_UP = "mp.hang_up"


class HangUp(Protocol):
    def watch(self, callback: Callable[[], object]) -> bool:
        """Call `callback` once if the client hangs up before the response ends; False if this cannot tell
        (then `receive` must be watched)."""

    def stop(self) -> None:
        """No call any more."""


async def until_disconnected(receive: Receive) -> None:
    """Returns when the client hangs up (the body has already been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def on_hang_up(scope: Mapping[str, Any] | None, receive: Receive, callback: Callable[[], object]) -> Callable[[], None]:
    """Call `callback` (once) when the client hangs up, until the function returned is called.

    Through the server's `HangUp` where the scope has one that can watch, else a task reading `receive`.
    """
    server: HangUp | None = scope.get(HANG_UP) if scope is not None else None
    if server is not None and server.watch(callback):
        return server.stop
    finished = False

    def watched(watcher: asyncio.Future[None]) -> None:
        if not finished and not watcher.cancelled() and watcher.exception() is None:
            callback()

    watcher = asyncio.ensure_future(until_disconnected(receive))
    watcher.add_done_callback(watched)

    def stop() -> None:
        nonlocal finished
        finished = True
        watcher.cancel()

    return stop


async def unless_disconnected(receive: Receive, work: Awaitable[T], scope: Mapping[str, Any] | None = None) -> T:
    """Run `work` in this task, cancelling it (and so the generation) if the client hangs up first.

    Not `work` in a task of its own raced against the watcher with `asyncio.wait`: that was a second
    task, a wait's futures and a loop turn on every answer. The hang-up cancels this task instead, as a
    hang-up must; the caller sees the CancelledError either way.
    """
    task = asyncio.current_task()
    assert task is not None
    stop = on_hang_up(scope, receive, task.cancel)
    try:
        return await work
    finally:
        stop()
