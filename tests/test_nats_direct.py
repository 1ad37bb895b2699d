"""The control plane's NATS client (services/nats_direct.py) on a real nats-server.

The gateway relays every token through a direct subscription, so these pin
what it relies on: plain messages reach the function from the read loop itself,
in order; a message with headers (the server's no-responders status) still
arrives, with its headers; a handler that raises does not stop the connection;
nothing arrives after unsubscribing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from infra.nats import NatsServer
from services import nats_direct


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    srv = NatsServer.start(Path(tmp_path_factory.mktemp("direct")) / "nats")
    yield srv
    srv.stop()


@pytest.fixture
async def clients(server: NatsServer) -> AsyncIterator[tuple[Client, Client]]:
    direct = await nats_direct.connect(server.url)
    plain = await nats.connect(server.url)
    yield direct, plain
    await direct.close()
    await plain.close()


Got = list[tuple[str, bytes, dict[str, str] | None, bool]]


async def _until(got: Got, n: int) -> None:
    async with asyncio.timeout(5):
        while len(got) < n:
            await asyncio.sleep(0.005)


async def test_plain_messages_come_from_the_read_loop_in_order(clients: tuple[Client, Client]) -> None:
    direct, plain = clients
    got: Got = []
    sub = None

    def on(subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        # Not the subscription's own task: the read loop called us as it parsed the message.
        assert sub is not None
        got.append((subject, data, headers, asyncio.current_task() is not sub._wait_for_msgs_task))

    sub = await nats_direct.subscribe(direct, "t.order.*", on)
    await direct.flush()
    for i in range(500):
        await plain.publish(f"t.order.{i % 7}", str(i).encode())
    await plain.flush()
    await _until(got, 500)
    assert [int(d) for _, d, _, _ in got] == list(range(500))
    assert {s for s, _, _, _ in got} == {f"t.order.{i}" for i in range(7)}
    assert all(h is None and from_read_loop for _, _, h, from_read_loop in got)
    # What nats-py counts for the connection still adds up.
    assert direct.stats["in_msgs"] >= 500


async def test_a_message_with_headers_arrives_with_them(clients: tuple[Client, Client]) -> None:
    direct, plain = clients
    got: Got = []
    await nats_direct.subscribe(direct, "t.hdr", lambda s, d, h: got.append((s, d, h, True)))
    await direct.flush()
    await plain.publish("t.hdr", b"a")
    await plain.publish("t.hdr", b"b", headers={"Status": "503"})
    await plain.flush()
    await _until(got, 2)
    assert got[0][:3] == ("t.hdr", b"a", None)
    assert got[1][1] == b"b" and got[1][2] is not None and got[1][2]["Status"] == "503"


async def test_no_responders_status_reaches_the_handler(clients: tuple[Client, Client]) -> None:
    """What the gateway sees when a provider vanished: the server's 503 on the reply subject."""
    direct, _ = clients
    got: Got = []
    inbox = direct.new_inbox()
    await nats_direct.subscribe(direct, inbox, lambda s, d, h: got.append((s, d, h, True)))
    # Nobody listens on the subject: the server answers the reply subject with a 503 status.
    await direct.publish("t.nobody.listens", b"x", reply=inbox, headers={"x": "1"})
    await direct.flush()
    await _until(got, 1)
    assert got[0][0] == inbox and got[0][2] is not None and got[0][2].get("Status") == "503"


async def test_a_failing_handler_does_not_stop_the_connection(clients: tuple[Client, Client]) -> None:
    direct, plain = clients
    got: Got = []

    def on(subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        if data == b"boom":
            raise RuntimeError("a bad message")
        got.append((subject, data, headers, True))

    await nats_direct.subscribe(direct, "t.fail", on)
    await direct.flush()
    for data in (b"1", b"boom", b"2"):
        await plain.publish("t.fail", data)
    await plain.flush()
    await _until(got, 2)
    assert [d for _, d, _, _ in got] == [b"1", b"2"]
    assert direct.is_connected


async def test_nothing_arrives_after_unsubscribing(clients: tuple[Client, Client]) -> None:
    direct, plain = clients
    got: Got = []
    sub = await nats_direct.subscribe(direct, "t.unsub", lambda s, d, h: got.append((s, d, h, True)))
    await direct.flush()
    await plain.publish("t.unsub", b"1")
    await plain.flush()
    await _until(got, 1)
    await sub.unsubscribe()
    await direct.flush()
    await plain.publish("t.unsub", b"2")
    await plain.flush()
    await asyncio.sleep(0.1)
    assert [d for _, d, _, _ in got] == [b"1"]


async def test_a_plain_client_takes_the_usual_path(clients: tuple[Client, Client]) -> None:
    _, plain = clients
    got: Got = []
    await nats_direct.subscribe(plain, "t.plain", lambda s, d, h: got.append((s, d, h, True)))
    await plain.flush()
    await plain.publish("t.plain", b"1")
    await plain.flush()
    await _until(got, 1)
    assert got[0][:2] == ("t.plain", b"1")
