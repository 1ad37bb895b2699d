"""Stopping a background task for good, for the control plane and the daemon alike.

On Python 3.11, `asyncio.wait_for` can swallow a cancellation that lands as the
future it waits for completes (gh-86296); nats-py waits with it in `connect` and in
a pull subscription's `fetch`. A task cancelled at that moment runs on, and a plain
`task.cancel(); await task` then waits for it forever: a stop that never ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

# How long one cancellation is given before it is sent again.
RETRY_S = 0.2


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it has ended, cancelling it again while a cancellation was lost.

    Whatever it ended with (its cancellation, an exception or a result) is read and dropped.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RETRY_S)
    if not task.cancelled():
        task.exception()  # read: an exception it ended with is not "never retrieved"
