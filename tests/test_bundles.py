"""Bundles: the frames a daemon makes for one gateway in one loop turn travel as one NATS message.

Real nats-server. The daemon's side is daemon/outbox.py, the gateway's the
ReplyRouter; between them only the bus. What must hold: every frame reaches its
request's stream in order, exactly as if sent alone; a provider can still only
reach the streams of requests sent to it; a bundle cannot carry more or bigger
frames for a stream than a frame sent alone could; a bundle that does not decode
is reported against its sender.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from daemon.outbox import Outbox
from daemon.provider import ACCEPT_HOLD_S, _Replier
from infra.nats import NatsServer
from schemas import bus, nats_direct, subjects
from services.gateway.replies import ReplyRouter, ReplyStream, StreamBroken

GW = "gw-bundles"


@pytest.fixture
async def ends(bare_nats: NatsServer) -> AsyncIterator[tuple[ReplyRouter, Client]]:
    gateway = await nats_direct.connect(bare_nats.url)
    daemon = await nats.connect(bare_nats.url)
    router = ReplyRouter(gateway, GW)
    await router.start()
    await gateway.flush()
    yield router, daemon
    await router.stop()
    await daemon.close()
    await gateway.close()


async def _send(outbox: Outbox, nc: Client, request_id: str, frame: bus.Frame) -> None:
    """What the daemon's sender does (daemon/provider.py `_Replier.send`)."""
    reply = subjects.reply("mac-a", GW, request_id)
    if not outbox.put(subjects.bundle("mac-a", GW), reply, request_id, bus.encode(frame)):
        await nc.publish(reply, bus.encode(frame))


def _frames(n_deltas: int) -> list[bus.Frame]:
    frames: list[bus.Frame] = [bus.Accepted(seq=0, prompt_tokens=3)]
    frames += [bus.Delta(seq=i + 1, text=f"t{i}", tokens=1, token_ids=[i]) for i in range(n_deltas)]
    frames.append(bus.Done(seq=n_deltas + 1, finish_reason="length", prompt_tokens=3, completion_tokens=n_deltas))
    return frames


async def _read_all(stream: ReplyStream, n: int) -> list[bus.Frame]:
    got: list[bus.Frame] = []
    for _ in range(n):
        frame = await stream.next(5)
        assert frame is not None, f"frame {len(got)} of {n} never came"
        got.append(frame)
    return got


async def _watched(daemon: Client) -> list[str]:
    """The subjects of the messages the daemon sends this gateway, as nats-server delivers them."""
    seen: list[str] = []

    async def watch(msg: object) -> None:
        seen.append(msg.subject)  # type: ignore[attr-defined]

    await daemon.subscribe(subjects.bundles_for_gateway(GW), cb=watch)
    await daemon.subscribe(subjects.replies_for_gateway(GW), cb=watch)
    await daemon.flush()
    return seen


async def _until(seen: list[str], n: int) -> None:
    for _ in range(200):  # the watcher's own deliveries may trail the router's
        if len(seen) >= n:
            return
        await asyncio.sleep(0.01)


async def test_frames_made_in_one_turn_go_as_one_bundle_and_each_reaches_its_stream_in_order(
    ends: tuple[ReplyRouter, Client],
) -> None:
    router, daemon = ends
    outbox = Outbox(daemon)
    requests = [f"req{i}" for i in range(3)]
    streams = {rid: router.open(rid, "mac-a", max_frames=100, max_bytes=1 << 20) for rid in requests}
    sent = {rid: _frames(5) for rid in requests}
    # Interleaved, as a decode step hands each running request a token: per turn, the first frame goes at
    # once on its own and the two after it in one bundle.
    for i in range(7):
        for rid in requests:
            await _send(outbox, daemon, rid, sent[rid][i])
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    got = {rid: await _read_all(streams[rid], 7) for rid in requests}
    assert got == sent
    assert (outbox.bundles, outbox.bundled_frames) == (7, 14)
    assert router.stray_frames == 0
    await outbox.close()


async def test_a_lone_streams_frames_go_at_once_on_its_reply_subject(ends: tuple[ReplyRouter, Client]) -> None:
    router, daemon = ends
    outbox = Outbox(daemon)
    seen = await _watched(daemon)
    stream = router.open("solo", "mac-a", max_frames=100, max_bytes=1 << 20)
    frames = _frames(3)
    for frame in frames:
        await _send(outbox, daemon, "solo", frame)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    assert await _read_all(stream, 5) == frames
    await outbox.close()
    await _until(seen, 5)
    assert seen == [subjects.reply("mac-a", GW, "solo")] * 5
    assert outbox.bundles == 0


async def test_a_frame_made_while_the_outbox_sends_queues_behind_it(ends: tuple[ReplyRouter, Client]) -> None:
    """The outbox's publish can wait (nats-py's buffer full while reconnecting): a request's next frame
    made meanwhile must not go at once and overtake the ones being sent."""
    router, daemon = ends
    outbox = Outbox(daemon)
    stream = router.open("held", "mac-a", max_frames=100, max_bytes=1 << 20)
    frames = _frames(3)
    await _send(outbox, daemon, "other", bus.Accepted(seq=0, prompt_tokens=1))  # first this turn: at once
    await _send(outbox, daemon, "held", frames[0])  # queued
    gate = asyncio.Event()
    publish = daemon.publish

    async def slow_publish(subject: str, payload: bytes = b"", **kw: object) -> None:
        await gate.wait()
        await publish(subject, payload)

    daemon.publish = slow_publish  # type: ignore[method-assign,assignment]
    flushing = asyncio.ensure_future(outbox.flush())
    await asyncio.sleep(0.01)
    daemon.publish = publish  # type: ignore[method-assign]
    for frame in frames[1:]:
        await _send(outbox, daemon, "held", frame)
    gate.set()
    await flushing
    await outbox.flush()
    assert await _read_all(stream, 5) == frames


async def test_a_bundle_reaches_only_the_senders_own_streams(ends: tuple[ReplyRouter, Client]) -> None:
    """mac-b bundles a frame for a request sent to mac-a: the subject names mac-b, so it is a stray."""
    router, daemon = ends
    theirs = router.open("victim", "mac-a", max_frames=100, max_bytes=1 << 20)
    mine = router.open("own", "mac-b", max_frames=100, max_bytes=1 << 20)
    forged = bus.encode(bus.Accepted(seq=0, prompt_tokens=1))
    bundle = bus.encode_bundle([("victim", forged), ("own", forged), ("mac-a.gw-bundles.victim", forged)])
    await daemon.publish(subjects.bundle("mac-b", GW), bundle)
    await daemon.flush()
    assert await mine.next(5) == bus.Accepted(seq=0, prompt_tokens=1)
    assert await theirs.next(0.2) is None
    assert router.stray_frames == 2


async def test_a_bundle_is_held_to_each_streams_frame_budget_and_size(ends: tuple[ReplyRouter, Client]) -> None:
    router, daemon = ends
    flooded = router.open("flooded", "mac-a", max_frames=3, max_bytes=1 << 20)
    oversized = router.open("oversized", "mac-a", max_frames=100, max_bytes=1 << 30)
    frames = [("flooded", bus.encode(f)) for f in _frames(5)]
    huge = bus.encode(bus.Delta(seq=0, text="x" * (1 << 20), tokens=1, token_ids=[1]))
    await daemon.publish(subjects.bundle("mac-a", GW), bus.encode_bundle([*frames, ("oversized", huge)]))
    await daemon.flush()
    assert len(await _read_all(flooded, 3)) == 3
    with pytest.raises(StreamBroken) as flood:
        await flooded.next(5)
    assert flood.value.violation == "frame_flood"
    with pytest.raises(StreamBroken) as big:
        await oversized.next(5)
    assert big.value.violation == "oversized_frame"


async def test_a_bundle_that_does_not_decode_is_reported_against_its_sender(ends: tuple[ReplyRouter, Client]) -> None:
    router, daemon = ends
    reported: list[tuple[str, str]] = []
    router.on_garbled_bundle = lambda provider_id, detail: reported.append((provider_id, detail))
    stream = router.open("r", "mac-c", max_frames=100, max_bytes=1 << 20)
    await daemon.publish(subjects.bundle("mac-c", GW), b"\xc1 not msgpack")
    # Too many frames for one bundle is not a bundle either.
    one = bus.encode(bus.Accepted(seq=0, prompt_tokens=1))
    await daemon.publish(subjects.bundle("mac-c", GW), bus.encode_bundle([("r", one)] * (bus.MAX_BUNDLE + 1)))
    await daemon.flush()
    for _ in range(100):
        if len(reported) == 2:
            break
        await asyncio.sleep(0.01)
    assert [p for p, _ in reported] == ["mac-c", "mac-c"]
    assert all("undecodable bundle from mac-c" in d for _, d in reported)
    # Nothing reached the stream; the request goes on waiting (and times out or fails over as usual).
    assert await stream.next(0.1) is None


def test_outbox_cuts_bundles_by_count_and_bytes() -> None:
    from daemon import outbox

    small = [("s", f"r{i}", b"x" * 10) for i in range(bus.MAX_BUNDLE + 5)]
    assert [len(p) for p in outbox._parts(small)] == [bus.MAX_BUNDLE, 5]
    big = [("s", f"r{i}", b"x" * (outbox.MAX_BUNDLE_BYTES // 2)) for i in range(3)]
    assert [len(p) for p in outbox._parts(big)] == [1, 1, 1]
    assert [item for part in outbox._parts(big) for item in part] == big


async def _bundled_replier(
    ends: tuple[ReplyRouter, Client], request_id: str
) -> tuple[Outbox, list[str], ReplyStream, _Replier]:
    """The daemon's sender of one request to a gateway that takes bundles, the stream it reaches, and a
    watch on the messages it sends."""
    router, daemon = ends
    outbox = Outbox(daemon)
    seen = await _watched(daemon)
    stream = router.open(request_id, "mac-a", max_frames=100, max_bytes=1 << 20)
    replier = _Replier(daemon, subjects.reply("mac-a", GW, request_id))
    replier.bundle_via(outbox)
    return outbox, seen, stream, replier


async def test_an_accepted_frame_and_a_fast_first_token_go_as_one_message(ends: tuple[ReplyRouter, Client]) -> None:
    """The daemon holds a request's Accepted up to ACCEPT_HOLD_S for its first token: one message, one
    wake-up of the gateway, on the path to the first token; each frame reaches the stream as if alone."""
    router, _ = ends
    outbox, seen, stream, replier = await _bundled_replier(ends, "fast")
    await replier.accept(3, 0)
    await replier.send(bus.Delta, text="t0", tokens=1, token_ids=[0])
    await replier.send(bus.Done, finish_reason="length", prompt_tokens=3, completion_tokens=1)
    assert await _read_all(stream, 3) == [
        bus.Accepted(seq=0, prompt_tokens=3),
        bus.Delta(seq=1, text="t0", tokens=1, token_ids=[0]),
        bus.Done(seq=2, finish_reason="length", prompt_tokens=3, completion_tokens=1),
    ]
    await outbox.close()
    await _until(seen, 2)
    # Accepted and the first token in one bundle; the Done, made in the same turn, queued behind them.
    assert seen == [subjects.bundle("mac-a", GW), subjects.reply("mac-a", GW, "fast")]
    assert router.stray_frames == 0


async def test_an_accepted_frame_whose_first_token_is_slow_goes_alone_after_the_hold(
    ends: tuple[ReplyRouter, Client],
) -> None:
    """A real model's prompt takes longer than the hold: its Accepted goes alone, ACCEPT_HOLD_S later, and
    the gateway knows the request is taken long before its first token."""
    outbox, seen, stream, replier = await _bundled_replier(ends, "slow")
    started = asyncio.get_running_loop().time()
    await replier.accept(3, 2)
    assert await stream.next(5) == bus.Accepted(seq=0, prompt_tokens=3, queue_position=2)
    assert asyncio.get_running_loop().time() - started >= ACCEPT_HOLD_S
    await replier.send(bus.Delta, text="t0", tokens=1, token_ids=[0])
    assert await stream.next(5) == bus.Delta(seq=1, text="t0", tokens=1, token_ids=[0])
    await outbox.close()
    await _until(seen, 2)
    assert seen == [subjects.reply("mac-a", GW, "slow")] * 2


async def test_without_bundles_an_accepted_frame_is_not_held(ends: tuple[ReplyRouter, Client]) -> None:
    router, daemon = ends
    stream = router.open("plain", "mac-a", max_frames=100, max_bytes=1 << 20)
    replier = _Replier(daemon, subjects.reply("mac-a", GW, "plain"))
    await replier.accept(3, 0)
    assert replier.held is None
    assert await stream.next(5) == bus.Accepted(seq=0, prompt_tokens=3)


async def test_a_streams_final_frame_is_told_after_its_reader_was_woken(ends: tuple[ReplyRouter, Client]) -> None:
    """`ReplyRouter.on_final` (the usage publisher's `flush_soon`) is called once per stream, on its Done frame
    whether it came alone or in a bundle, and after the stream's reader was woken: what it schedules runs after
    the reader's next step, in which the reader settles its request."""
    router, daemon = ends
    loop = asyncio.get_running_loop()
    order: list[str] = []

    def on_final() -> None:
        loop.call_soon(order.append, "flush")

    router.on_final = on_final
    outbox = Outbox(daemon)
    streams = {rid: router.open(rid, "mac-a", max_frames=100, max_bytes=1 << 20) for rid in ("fin-a", "fin-b")}

    async def reader(rid: str) -> None:
        while True:
            frame = await streams[rid].next(5)
            assert frame is not None
            if isinstance(frame, bus.Done):
                order.append(f"{rid} done")
                return

    readers = [asyncio.ensure_future(reader(rid)) for rid in streams]
    await asyncio.sleep(0)
    for frame in _frames(2):
        # Both in one turn: the first alone on its reply subject, the second in a bundle.
        for rid in streams:
            await _send(outbox, daemon, rid, frame)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        if isinstance(frame, bus.Delta):
            assert order == [], "a delta is not the final frame"
    await asyncio.wait_for(asyncio.gather(*readers), 5)
    for _ in range(50):
        if len(order) >= 4:
            break
        await asyncio.sleep(0.01)
    # Each flush runs after the step of the reader whose final frame asked for it: never more flushes than
    # readers done at any point. (Frames a busy machine delivers in one read wake both readers before either
    # flush runs, so the exact interleaving is the machine's.)
    assert sorted(order) == ["fin-a done", "fin-b done", "flush", "flush"]
    prefixes = [order[: i + 1] for i in range(len(order))]
    assert all(p.count("flush") <= len(p) - p.count("flush") for p in prefixes), order
    await outbox.close()
