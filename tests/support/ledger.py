"""Wait until the usage stream's events are written to Postgres (settlement is asynchronous).

A request's reservation and settlement are acknowledged by the usage stream
before its response ends, and written to the ledger a few milliseconds later
by a consumer (services/usage/ledger.py). A test that reads the ledger or the
quota counters straight after a response waits for that first, as a buyer's
GET /v1/usage does.
"""

from __future__ import annotations

import asyncio
import time

import nats
import nats.js.errors

from schemas import subjects


async def written_async(nats_url: str, timeout_s: float = 15.0) -> None:
    nc = await nats.connect(nats_url, inbox_prefix=subjects.CONTROL_INBOX_PREFIX, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                state = (await js.stream_info(subjects.USAGE_STREAM)).state
            except nats.js.errors.NotFoundError:
                return  # no stream: metering off, or settlement straight to Postgres
            if state.messages == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"usage events still unwritten after {timeout_s}s: {state}")
            await asyncio.sleep(0.01)
    finally:
        await nc.close()


def written(nats_url: str, timeout_s: float = 15.0) -> None:
    """Return once every usage event published so far is in Postgres (raises after `timeout_s`)."""
    asyncio.run(written_async(nats_url, timeout_s))
