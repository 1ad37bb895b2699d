"""A gateway says it is still there to each provider running its requests, and which it still wants; a provider
stops a silent gateway's requests, and the ones it no longer wants.

The end to end case (a killed gateway replica's request stops on the Mac within a
second or two) is in test_quotas.py (`test_a_killed_gateway_loses_no_usage`). Here:
the router's side on a real nats-server, and the provider's rule.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from daemon.engine.synthetic import SyntheticEngine
from daemon.gateways import MISSED, GatewayWatch
from infra.nats import NatsServer
from schemas import bus, nats_direct, subjects
from services.gateway.replies import ReplyRouter
from tests.support.daemons import provider_in_process

GW = "gw-keepalive"
_NOTICE: msgspec.msgpack.Decoder[bus.PoolNotice | bus.GatewayAlive] = msgspec.msgpack.Decoder(
    bus.PoolNotice | bus.GatewayAlive
)


async def test_the_router_tells_exactly_the_providers_of_open_streams_and_stops_when_they_close(
    bare_nats: NatsServer,
) -> None:
    gateway = await nats_direct.connect(bare_nats.url)
    daemon = await nats.connect(bare_nats.url)
    heard: list[tuple[str, bus.PoolNotice | bus.GatewayAlive, float]] = []

    async def on_notice(msg: Msg) -> None:
        heard.append((msg.subject, _NOTICE.decode(msg.data), time.monotonic()))

    for provider in ("mac-a", "mac-b", "mac-idle"):
        await daemon.subscribe(subjects.notices(provider), cb=on_notice)
    await daemon.flush()
    router = ReplyRouter(gateway, GW, keepalive_ms=100)
    await router.start()
    try:
        streams = [
            router.open("req-a1", "mac-a", max_frames=10, max_bytes=1000),
            router.open("req-a2", "mac-a", max_frames=10, max_bytes=1000),
            router.open("req-b1", "mac-b", max_frames=10, max_bytes=1000),
        ]
        await asyncio.sleep(0.55)
        to = {subject for subject, _, _ in heard}
        assert to == {subjects.notices("mac-a"), subjects.notices("mac-b")}, "only providers running requests"
        a = [(notice, at) for subject, notice, at in heard if subject == subjects.notices("mac-a")]
        # One notice per interval per provider, not one per request: 0.55 s holds 5 intervals of 0.1 s.
        assert 3 <= len(a) <= 6, len(a)  # one per interval (two requests there: not one per request)
        for notice, _ in a:
            assert notice == bus.GatewayAlive(gateway_id=GW, provider_id="mac-a", request_ids=["req-a1", "req-a2"])
        b = [notice for subject, notice, _ in heard if subject == subjects.notices("mac-b")]
        assert b[-1] == bus.GatewayAlive(gateway_id=GW, provider_id="mac-b", request_ids=["req-b1"])
        gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(a)]
        assert max(gaps) < 0.35, gaps

        for stream in streams:
            router.close(stream)
        await asyncio.sleep(0.15)
        quiet = len(heard)
        await asyncio.sleep(0.35)
        assert len(heard) == quiet, "the router still speaks to providers it has no request with"
    finally:
        await router.stop()
        await daemon.close()
        await gateway.close()


async def test_a_router_without_keepalive_sends_nothing(bare_nats: NatsServer) -> None:
    gateway = await nats_direct.connect(bare_nats.url)
    daemon = await nats.connect(bare_nats.url)
    heard: list[bytes] = []

    async def on_notice(msg: Msg) -> None:
        heard.append(msg.data)

    await daemon.subscribe(subjects.notices("mac-a"), cb=on_notice)
    await daemon.flush()
    router = ReplyRouter(gateway, GW)
    await router.start()
    try:
        router.open("req-a1", "mac-a", max_frames=10, max_bytes=1000)
        await asyncio.sleep(0.3)
        assert heard == []
    finally:
        await router.stop()
        await daemon.close()
        await gateway.close()


@pytest.mark.unit
def test_a_gateway_is_silent_after_missing_its_intervals_and_only_one_that_promised_them() -> None:
    now = [100.0]
    watch = GatewayWatch(clock=lambda: now[0])
    watch.heard("gw-1")
    now[0] += MISSED * 2.0 - 0.01
    assert not watch.silent("gw-1", 2.0), "a late word is not death"
    now[0] += 0.02
    assert watch.silent("gw-1", 2.0)
    assert not watch.silent("gw-1", 0.0), "a gateway that promised nothing (an older one) is never judged"
    watch.heard("gw-1")
    assert not watch.silent("gw-1", 2.0), "heard again: alive"
    assert not watch.silent("gw-never-heard", 2.0)


@pytest.mark.unit
def test_the_watch_forgets_gateways_with_no_request_left() -> None:
    now = [0.0]
    watch = GatewayWatch(clock=lambda: now[0])
    watch.heard("gw-1")
    watch.heard("gw-2")
    watch.keep_only(["gw-2"])
    now[0] += 100
    assert not watch.silent("gw-1", 1.0), "forgotten: judged again only once heard again"
    assert watch.silent("gw-2", 1.0)


# ---- the provider's side: a real daemon (synthetic engine, a token every 10 ms) on a real nats-server ----

PID = "mac-watch"


@pytest.fixture
async def pool(bare_nats: NatsServer) -> AsyncIterator[Client]:
    """A provider in this process, and the test's connection, which plays its gateways."""
    async with provider_in_process(bare_nats.url, PID, SyntheticEngine("synthetic", token_delay_s=0.01)) as nc:
        yield nc


class _Answer:
    """One request's frames as they come (its gateway's reply subject)."""

    def __init__(self) -> None:
        self.frames: list[bus.Frame] = []
        self.ended = asyncio.Event()

    async def on_frame(self, msg: Msg) -> None:
        self.frames.append(bus.decode_frame(msg.data))
        if isinstance(self.frames[-1], bus.Done | bus.Failed):
            self.ended.set()

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.frames if isinstance(f, bus.Delta))


async def _send(nc: Client, gateway_id: str, request_id: str, *, keepalive_ms: int) -> _Answer:
    """A work message as that gateway sends one: 1,000 tokens, 10 s at the engine's pace."""
    answer = _Answer()
    reply = subjects.reply(PID, gateway_id, request_id)
    await nc.subscribe(reply, cb=answer.on_frame)
    request = bus.InferenceRequest(
        request_id=request_id,
        model="synthetic",
        messages=[bus.BusMessage(role="user", content="go on")],
        params=bus.SamplingParams(max_tokens=1000),
        keepalive_ms=keepalive_ms,
    )
    await nc.publish(subjects.work(PID), bus.encode(request), reply=reply)
    return answer


async def _alive(nc: Client, gateway_id: str, request_ids: list[str] | None) -> None:
    notice = bus.GatewayAlive(gateway_id=gateway_id, provider_id=PID, request_ids=request_ids)
    await nc.publish(subjects.notices(PID), bus.encode(notice))


async def test_a_silent_gateways_requests_stop_and_a_talking_ones_run_on(pool: Client) -> None:
    live = await _send(pool, "gw-live", "r-live", keepalive_ms=200)
    dead = await _send(pool, "gw-dead", "r-dead", keepalive_ms=200)
    old = await _send(pool, "gw-old", "r-old", keepalive_ms=0)  # an older gateway: promised nothing
    for _ in range(12):  # 1.2 s: gw-dead is silent for 6 of its intervals, gw-live speaks twice in each
        await _alive(pool, "gw-live", ["r-live"])
        await asyncio.sleep(0.1)
    await asyncio.wait_for(dead.ended.wait(), 2)
    # Said as a failure another provider can take over from (a paused gateway fails the answer over when it
    # wakes), not as an answer complete at this length.
    assert isinstance(dead.frames[-1], bus.Failed)
    assert dead.frames[-1].code == "gateway_unheard"
    # Stopped after 3 silent intervals (0.6 s) and one check (0.25 s), not at its 1,000th token (10 s).
    assert dead.tokens < 300, dead.tokens
    assert not live.ended.is_set(), "a gateway that keeps talking keeps its request"
    assert not old.ended.is_set(), "an older gateway's request is never judged"
    # gw-live falls silent too: its request stops within its 3 intervals and a check.
    await asyncio.wait_for(live.ended.wait(), 2)
    assert isinstance(live.frames[-1], bus.Failed)
    assert live.frames[-1].code == "gateway_unheard"
    assert not old.ended.is_set()
    await pool.publish(subjects.cancel(PID), bus.encode(bus.Cancel(request_id="r-old")))
    await asyncio.wait_for(old.ended.wait(), 2)


async def test_a_request_two_notices_in_a_row_leave_out_stops(pool: Client) -> None:
    # Intervals of 1 s: none of these gateways falls silent here, whatever the machine's load.
    kept = await _send(pool, "gw-1", "r-kept", keepalive_ms=1000)
    dropped = await _send(pool, "gw-1", "r-dropped", keepalive_ms=1000)
    other = await _send(pool, "gw-2", "r-other", keepalive_ms=1000)  # another gateway's: not judged by gw-1
    await asyncio.sleep(0.05)
    await _alive(pool, "gw-1", ["r-kept"])
    await _alive(pool, "gw-2", ["r-other"])
    await asyncio.sleep(0.08)
    assert not dropped.ended.is_set(), "left out once (it may have crossed its work message): still running"
    await _alive(pool, "gw-1", ["r-kept", "r-dropped"])  # listed again: its count starts over
    await _alive(pool, "gw-2", ["r-other"])
    await asyncio.sleep(0.08)
    await _alive(pool, "gw-1", ["r-kept"])
    await _alive(pool, "gw-2", ["r-other"])
    await asyncio.sleep(0.08)
    assert not dropped.ended.is_set()
    await _alive(pool, "gw-1", ["r-kept"])
    await _alive(pool, "gw-2", ["r-other"])
    await asyncio.wait_for(dropped.ended.wait(), 1)
    assert isinstance(dropped.frames[-1], bus.Done)
    assert dropped.frames[-1].finish_reason == "cancelled"
    # A notice that lists nothing (None: too many to list) stops nothing.
    for _ in range(3):
        await _alive(pool, "gw-1", None)
        await _alive(pool, "gw-2", ["r-other"])
        await asyncio.sleep(0.08)
    assert not kept.ended.is_set()
    assert not other.ended.is_set()
    for request_id in ("r-kept", "r-other"):
        await pool.publish(subjects.cancel(PID), bus.encode(bus.Cancel(request_id=request_id)))
    await asyncio.wait_for(asyncio.gather(kept.ended.wait(), other.ended.wait()), 2)
