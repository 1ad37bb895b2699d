"""A provider daemon's work subscription on a real nats-server, with the synthetic engine in this process.

The daemon takes work messages straight from nats-py's read loop (schemas/nats_direct.py)
and queues its frames without a coroutine. What a gateway relies on: a work message is
answered on its reply subject, in order, from Accepted to Done; one with headers (a trace
context) is served the same way; one that does not decode gets a `bad_request` frame; one
whose reply subject is not this provider's gets nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from daemon.engine.synthetic import SyntheticEngine
from infra.nats import NatsServer
from schemas import bus, subjects
from tests.support.daemons import provider_in_process

PID = "mac-work"
GW = "gw-work"
MODEL = "synthetic"


@pytest.fixture
async def gateway(bare_nats: NatsServer) -> AsyncIterator[Client]:
    async with provider_in_process(bare_nats.url, PID, SyntheticEngine(MODEL)) as nc:
        yield nc


async def _answer(nc: Client, request_id: str, data: bytes, headers: dict[str, str] | None = None) -> list[bus.Frame]:
    """Publish a work message as a gateway does and read its frames until the last one."""
    reply = subjects.reply(PID, GW, request_id)
    sub = await nc.subscribe(reply)
    await nc.publish(subjects.work(PID), data, reply=reply, headers=headers)
    frames: list[bus.Frame] = []
    while not frames or not isinstance(frames[-1], bus.Done | bus.Failed):
        frames.append(bus.decode_frame((await sub.next_msg(timeout=10)).data))
    await sub.unsubscribe()
    return frames


def _work(request_id: str, tokens: int) -> bytes:
    return bus.encode(
        bus.InferenceRequest(
            request_id=request_id,
            model=MODEL,
            messages=[bus.BusMessage(role="user", content="say something")],
            params=bus.SamplingParams(max_tokens=tokens),
        )
    )


async def test_work_is_answered_in_order_from_accepted_to_done(gateway: Client) -> None:
    frames = await _answer(gateway, "r-plain", _work("r-plain", 12))
    assert isinstance(frames[0], bus.Accepted)
    assert isinstance(frames[-1], bus.Done)
    assert frames[-1].completion_tokens == 12
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert sum(f.tokens for f in frames if isinstance(f, bus.Delta)) == 12


async def test_work_with_a_trace_context_is_served_the_same(gateway: Client) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    frames = await _answer(gateway, "r-traced", _work("r-traced", 3), headers={"traceparent": traceparent})
    assert isinstance(frames[0], bus.Accepted)
    assert isinstance(frames[-1], bus.Done)
    assert frames[-1].completion_tokens == 3


async def test_undecodable_work_is_answered_bad_request_and_the_daemon_goes_on(gateway: Client) -> None:
    frames = await _answer(gateway, "r-garbage", b"\xc1 not msgpack")
    assert len(frames) == 1
    assert isinstance(frames[0], bus.Failed)
    assert frames[0].code == "bad_request"
    # The read loop was not disturbed: the next request is served.
    frames = await _answer(gateway, "r-after", _work("r-after", 2))
    assert isinstance(frames[-1], bus.Done)


async def test_work_whose_reply_subject_is_not_ours_gets_nothing(gateway: Client) -> None:
    elsewhere = subjects.reply("mac-other", GW, "r-stolen")
    sub = await gateway.subscribe(elsewhere)
    await gateway.publish(subjects.work(PID), _work("r-stolen", 2), reply=elsewhere)
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=0.5)
    # And the daemon still serves its own.
    frames = await _answer(gateway, "r-own", _work("r-own", 2))
    assert isinstance(frames[-1], bus.Done)
