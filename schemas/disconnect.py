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
    """Run `work`, cancelling it (and so the generation) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return await task
