"""A request that ends while the gateway waits for a provider's acceptance leaves nothing behind.

The gateway publishes the work, then waits (up to MP_ACCEPT_TIMEOUT_S) for the
provider's Accepted. If the request's task is cancelled in that window (the
replica shutting down, a caller giving up) or the publish itself fails, the
provider's in-flight count on this replica, its reply stream and its pool watch
must all be released, and a provider that got the work must be told to cancel
it: otherwise routing counts the provider busier for good and it generates for
nobody. Real nats-server; the "provider" is a plain subscriber that never accepts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client

from infra.nats import NatsServer
from schemas import bus, nats_direct, subjects
from services.errors import CoordinatorUnavailable
from services.gateway.dispatch import Dispatcher
from services.gateway.pool import PoolView
from services.gateway.replies import ReplyRouter

PID = "mac-silent"


class Provider:
    """Takes work and never answers; records the work and cancels it is sent."""

    def __init__(self) -> None:
        self.work: list[bus.InferenceRequest] = []
        self.cancels: list[str] = []
        self.got_work = asyncio.Event()
        self.got_cancel = asyncio.Event()

    async def start(self, nc: Client) -> None:
        async def on_work(msg: object) -> None:
            self.work.append(msgspec.msgpack.decode(msg.data, type=bus.InferenceRequest))  # type: ignore[attr-defined]
            self.got_work.set()

        async def on_cancel(msg: object) -> None:
            self.cancels.append(msgspec.msgpack.decode(msg.data, type=bus.Cancel).request_id)  # type: ignore[attr-defined]
            self.got_cancel.set()

        await nc.subscribe(subjects.work(PID), cb=on_work)
        await nc.subscribe(subjects.cancel(PID), cb=on_cancel)
        await nc.flush()


class Gateway:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.pool = PoolView()
        self.pool.observe(
            bus.Heartbeat(
                provider_id=PID,
                daemon_version="t",
                boot_id="b",
                models=[bus.ModelInfo(id="m")],
                slots=1,
                slots_free=1,
                queue_depth=0,
                queue_limit=4,
                decode_tps=10.0,
                interval_s=60.0,
                sent_at_ms=0,
            )
        )
        self.router = ReplyRouter(nc, "gw-test")
        self.dispatcher = Dispatcher(
            nc, self.pool, self.router, "gw-test", accept_timeout_s=30, stream_idle_timeout_s=30, request_timeout_s=60
        )

    def leaked(self) -> dict[str, object]:
        """What a finished request must not leave behind (all empty / zero when clean)."""
        return {
            "inflight": self.pool.measured(PID).inflight,
            "sent_since_heartbeat": self.pool.providers[PID].sent_since_heartbeat,
            "reply_streams": len(self.router._streams),
            "watchers": len(self.pool._watchers),
        }


CLEAN = {"inflight": 0, "sent_since_heartbeat": 0, "reply_streams": 0, "watchers": 0}


def _request(request_id: str) -> bus.InferenceRequest:
    return bus.InferenceRequest(
        request_id=request_id,
        model="m",
        messages=[bus.BusMessage(role="user", content="hi")],
        params=bus.SamplingParams(max_tokens=4),
    )


@pytest.fixture
async def parties(bare_nats: NatsServer) -> AsyncIterator[tuple[Gateway, Provider, Client]]:
    gw_nc = await nats_direct.connect(bare_nats.url)
    # A client whose flush() is a barrier (schemas/nats_direct.py): the work must find its subscription.
    provider_nc = await nats_direct.connect(bare_nats.url)
    provider = Provider()
    await provider.start(provider_nc)
    gateway = Gateway(gw_nc)
    await gateway.router.start()
    await gw_nc.flush()
    yield gateway, provider, gw_nc
    await gateway.router.stop()
    await provider_nc.close()
    if not gw_nc.is_closed:
        await gw_nc.close()


async def test_a_request_cancelled_while_awaiting_acceptance_releases_its_leg_and_cancels_the_work(
    parties: tuple[Gateway, Provider, Client],
) -> None:
    gateway, provider, _ = parties
    task = asyncio.ensure_future(gateway.dispatcher.start(_request("req-cancelled")))
    await asyncio.wait_for(provider.got_work.wait(), 5)
    assert gateway.leaked()["inflight"] == 1  # the wait for Accepted is under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gateway.leaked() == CLEAN
    # The provider that got the work hears it is not wanted.
    await asyncio.wait_for(provider.got_cancel.wait(), 5)
    assert provider.cancels == ["req-cancelled"]
    # A late Accepted from it is a stray frame, not a resurrected stream.
    await gateway.nc.publish(
        subjects.reply(PID, "gw-test", "req-cancelled"), bus.encode(bus.Accepted(seq=0, prompt_tokens=1))
    )
    await gateway.nc.flush()
    await asyncio.sleep(0.05)
    assert gateway.leaked() == CLEAN


async def test_a_publish_that_fails_is_a_503_and_leaks_nothing(parties: tuple[Gateway, Provider, Client]) -> None:
    gateway, provider, gw_nc = parties
    await gw_nc.close()
    with pytest.raises(CoordinatorUnavailable) as raised:
        await gateway.dispatcher.start(_request("req-no-nats"))
    assert raised.value.status == 503
    assert "cannot reach the provider network" in raised.value.message
    assert gateway.leaked() == CLEAN
    assert provider.work == []
