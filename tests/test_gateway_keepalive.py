"""A gateway says it is still there to each provider running its requests; a provider stops a silent one's.

The end to end case (a killed gateway replica's request stops on the Mac within a
second or two) is in test_quotas.py (`test_a_killed_gateway_loses_no_usage`). Here:
the router's side on a real nats-server, and the provider's rule.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from daemon.gateways import MISSED, GatewayWatch
from infra.nats import NatsServer
from schemas import bus, nats_direct, subjects
from services.gateway.replies import ReplyRouter

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
        assert 4 <= len(a) <= 6, len(a)
        assert {notice for notice, _ in a} == {bus.GatewayAlive(gateway_id=GW, provider_id="mac-a")}
        gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(a)]
        assert max(gaps) < 0.3, gaps

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
