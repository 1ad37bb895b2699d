"""services/lifecycle.py on its own: the order of a replica's stop, timed on the event loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.errors import ShuttingDown
from services.lifecycle import Lifecycle

# Pure: no server, no process, no network (`just test -m unit`).
pytestmark = pytest.mark.unit


async def test_requests_are_taken_during_the_delay_then_refused_and_the_running_ones_awaited() -> None:
    life = Lifecycle(delay_s=0.2, grace_s=2.0, routes=True)
    life.admit()  # a stream already running
    cuts: list[float] = []
    started = time.monotonic()
    stopping = asyncio.ensure_future(life.stop(cut=lambda: cuts.append(time.monotonic())))
    await asyncio.sleep(0.05)
    assert life.stopping  # readiness fails at once
    life.admit()  # but the delay still takes requests (load balancers are catching up)
    life.done()
    await asyncio.sleep(0.25)
    with pytest.raises(ShuttingDown) as refused:
        life.admit()
    assert refused.value.status == 503
    assert refused.value.code == "coordinator_unavailable"
    assert refused.value.headers["retry-after"] == "1"
    life.done()  # the stream ends by itself, within the grace
    assert await asyncio.wait_for(stopping, 1) is True
    assert cuts == []
    assert time.monotonic() - started < 1.0


async def test_past_the_grace_the_running_requests_are_cut_once() -> None:
    life = Lifecycle(delay_s=0.0, grace_s=0.3, routes=False)
    life.admit()
    cuts: list[float] = []
    started = time.monotonic()

    def cut() -> None:
        cuts.append(time.monotonic() - started)
        asyncio.get_running_loop().call_later(0.05, life.done)  # the cut stream settles and ends

    assert await asyncio.wait_for(life.stop(cut=cut), 2) is False
    assert len(cuts) == 1
    assert 0.3 <= cuts[0] < 0.6
    assert life.running == 0
