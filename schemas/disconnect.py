"""The client-disconnect watcher of a non-stream answer, for the gateway and the daemon's local API.

ASGI only (the server's `receive`), no web framework: a non-stream request's body has been
read, so the next message the server delivers is the client's `http.disconnect`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

Receive = Callable[[], Awaitable[Mapping[str, Any]]]


async def until_disconnected(receive: Receive) -> None:
    """Returns when the client hangs up (the body has already been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Run `work` in this task, cancelling it (and so the generation) if the client hangs up first.

    Not `work` in a task of its own raced against the watcher with `asyncio.wait`: that was a second
    task, a wait's futures and a loop turn on every answer. The watcher's callback cancels this task
    instead, as a hang-up must; the caller sees the CancelledError either way.
    """
    task = asyncio.current_task()
    assert task is not None
    finished = False

    def on_hang_up(watcher: asyncio.Future[None]) -> None:
        if not finished and not watcher.cancelled() and watcher.exception() is None:
            task.cancel()

    watcher = asyncio.ensure_future(until_disconnected(receive))
    watcher.add_done_callback(on_hang_up)
    try:
        return await work
    finally:
        finished = True
        watcher.cancel()
