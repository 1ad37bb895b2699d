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
import nats.js.api
import nats.js.errors
from nats.js.client import JetStreamContext

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


async def ensure_usage_stream(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create MP_USAGE as the ledger does (services/usage/ledger.py). A gateway of the same server may have
    made it first with its own settings: the server then says so (10058), which still proves the request
    was let through."""
    try:
        await js.add_stream(
            name=subjects.USAGE_STREAM,
            subjects=[subjects.ALL_USAGE_EVENTS],
            retention=nats.js.api.RetentionPolicy.WORK_QUEUE,
            storage=nats.js.api.StorageType.FILE,
            num_replicas=replicas,
        )
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != 10058:  # "stream name already in use with a different configuration"
            raise
