"""A response's head leaves with its first body bytes (services/http_head.py), and never waits past its turn."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from schemas.disconnect import HANG_UP, on_hang_up
from services.http_head import BODY_ARRIVED, BODY_GRACE_S, HeadWithBody, _HeadHeld


class _Recording:
    """A transport that records each write (each would be one `send()`)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


@pytest.mark.unit
async def test_a_head_and_a_body_of_one_turn_are_one_write_and_later_bodies_go_at_once() -> None:
    transport = _Recording()
    held = _HeadHeld(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    held.write(b"HEAD")
    held.write(b"BODY1")
    assert transport.writes == [b"HEADBODY1"]
    held.write(b"BODY2")
    assert transport.writes == [b"HEADBODY1", b"BODY2"]
    await asyncio.sleep(0)
    assert transport.writes == [b"HEADBODY1", b"BODY2"], "the turn's end wrote nothing more"
    assert held.get_extra_info("peername") == "info:peername"


@pytest.mark.unit
async def test_a_head_without_a_body_in_its_turn_goes_alone_at_the_turn_end() -> None:
    transport = _Recording()
    held = _HeadHeld(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    held.write(b"HEAD")
    assert transport.writes == []
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD"]
    held.write(b"BODY")
    assert transport.writes == [b"HEAD", b"BODY"]


@pytest.mark.unit
async def test_closing_writes_the_held_head_first_and_a_gone_buyer_gets_nothing() -> None:
    transport = _Recording()
    held = _HeadHeld(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    held.write(b"HEAD")
    held.close()
    assert (transport.writes, transport.closed) == ([b"HEAD"], True)
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD"]

    gone = _Recording()
    held = _HeadHeld(gone, asyncio.get_running_loop())  # type: ignore[arg-type]
    held.write(b"HEAD")
    gone.closed = True  # the connection was lost in the same turn
    await asyncio.sleep(0)
    assert gone.writes == []


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/json":
        headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"ok":true}'})
        return
    # /slow: the head now, the body 0.3 s later, then the end.
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await asyncio.sleep(0.3)
    await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


@contextlib.asynccontextmanager
async def _server(app: Any = _app) -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, http=HeadWithBody, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn has no ready event
            await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    (length,) = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return head, await reader.readexactly(int(length.split(b":")[1]))


async def test_an_answer_arrives_in_one_piece_on_a_kept_alive_connection_and_on_a_closed_one() -> None:
    async with _server() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            writer.write(b"POST /json HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
            head, body = await _read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"content-type: application/json" in head
            assert body == b'{"ok":true}'
        for _ in range(20):
            # One send() for head and body: the first read has it all. (With uvicorn's own httptools
            # protocol, 1 first read in 200 did here: the head came alone.)
            writer.write(b"POST /json HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
            first = await asyncio.wait_for(reader.read(65536), 5)
            assert first.startswith(b"HTTP/1.1 200 OK\r\n")
            assert first.endswith(b'\r\n\r\n{"ok":true}')
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /json HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}")
        everything = await asyncio.wait_for(reader.read(), 5)  # to the end: the server closed the connection
        assert everything.startswith(b"HTTP/1.1 200 OK\r\n")
        assert everything.endswith(b'\r\n\r\n{"ok":true}')
        writer.close()


async def test_a_head_whose_body_is_not_ready_is_not_held_back() -> None:
    async with _server() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = time.monotonic()
        writer.write(b"POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        head_at = time.monotonic() - sent
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"transfer-encoding: chunked" in head
        assert head_at < 0.2, f"the head waited for the body ({head_at:.3f} s)"
        rest = b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"
        assert await asyncio.wait_for(reader.readexactly(len(rest)), 5) == rest
        writer.close()


async def test_a_client_that_leaves_is_told_by_the_connection_and_one_whose_answer_ended_is_not() -> None:
    """`HeadWithBody` offers a `HangUp` in the scope: the app hears of a client that left without a task
    reading `receive` (it is called once, for the body), and only while its answer is unfinished."""
    heard: list[str] = []
    receives: list[str] = []
    release = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return

        async def counted() -> Any:
            receives.append(scope["path"])
            return await receive()

        while (await counted()).get("more_body"):
            pass
        assert HANG_UP in scope
        stop = on_hang_up(scope, counted, lambda: heard.append(scope["path"]))
        try:
            if scope["path"] == "/slow":
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
                await release.wait()  # the client leaves meanwhile
                return
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            await release.wait()  # answered: the client leaving now is no hang-up
        finally:
            stop()

    async with _server(app) as port:
        for path in ("/slow", "/done"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{{}}".encode())
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.close()
            await writer.wait_closed()
            deadline = time.monotonic() + 2
            while path == "/slow" and not heard and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
        release.set()
    assert heard == ["/slow"], "told of the client that left mid-answer, only"
    assert receives == ["/slow", "/done"], "receive was read for the body only: no watcher task"


async def test_a_task_starts_once_its_body_is_whole_or_cannot_wait_and_is_told_so() -> None:
    """A request's task starts when its body has arrived (`BODY_ARRIVED` then says True: its reader needs
    no timer), or BODY_GRACE_S after its headers for a client that trickles it, or at once where the
    client waits for the app (`Expect: 100-continue`) or the server's buffer is full. A client that leaves
    before its body is whole is heard of: its task starts then, and `receive` says it left."""
    seen: list[tuple[str, bool, int, float]] = []
    headers_at: dict[str, float] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        at_start = scope[BODY_ARRIVED]()
        started = time.monotonic() - headers_at.get(scope["path"], time.monotonic())
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        seen.append((scope["path"], at_start, size, started))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async with _server(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def ask(path: str, head: bytes, *parts: tuple[float, bytes]) -> None:
            headers_at[path] = time.monotonic()
            writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nhost: x\r\n" + head + b"\r\n")
            for pause, part in parts:
                await asyncio.sleep(pause)
                writer.write(part)
            await _read_response(reader)

        await ask("/whole", b"content-length: 2\r\n", (0, b"{}"))
        await ask("/empty", b"content-length: 0\r\n")
        await ask("/apart", b"content-length: 2\r\n", (0.1, b"{}"))  # as httpx writes: headers, then body
        await ask("/trickled", b"content-length: 2\r\n", (0.1, b"{"), (0.9, b"}"))
        big = 300_000  # past uvicorn's 64 KiB buffer: reading pauses until the app reads
        await ask("/big", f"content-length: {big}\r\n".encode(), (0.05, b"x" * big))
        writer.write(b"POST /continue HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"{}")
        await _read_response(reader)
        writer.close()

        # Headers and half a body, then gone: the app runs at once, to hear it.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        headers_at["/left"] = time.monotonic()
        writer.write(b"POST /left HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{")
        await asyncio.sleep(0.1)
        writer.close()
        await asyncio.sleep(0.3)

    by_path = {path: (at_start, size, started) for path, at_start, size, started in seen}
    assert list(by_path) == ["/whole", "/empty", "/apart", "/trickled", "/big", "/continue", "/left"]
    assert by_path["/whole"][:2] == by_path["/apart"][:2] == (True, 2)
    assert by_path["/empty"][:2] == (True, 0)
    assert by_path["/apart"][2] >= 0.1, "started at its body, not its headers"
    at_start, size, started = by_path["/trickled"]
    assert (at_start, size) == (False, 2)
    assert BODY_GRACE_S - 0.05 <= started < 0.95, "started after the grace, before the rest of its body"
    assert by_path["/big"][:2] == (False, big)
    assert by_path["/big"][2] < BODY_GRACE_S - 0.2, "a full buffer starts the task, not the grace"
    assert by_path["/continue"][:2] == (False, 2)
    assert by_path["/left"][:2] == (True, 0), "started when its client left: `receive` tells it at once"
    assert by_path["/left"][2] < BODY_GRACE_S, "started when its client left, not after the grace"


async def test_a_pipelined_request_whose_body_never_comes_still_starts_after_the_grace() -> None:
    """A request behind another on the same connection, its body unfinished and nothing more sent: its
    task starts BODY_GRACE_S after the one before it ended (then the app's own body timeout runs), so a
    client cannot park a connection with neither a task nor a timer."""
    started: dict[str, float] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        started[scope["path"]] = time.monotonic()
        if scope["path"] == "/stalled":
            return  # it was started: that is what this test is about (uvicorn answers 500 for it)
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async with _server(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = time.monotonic()
        writer.write(
            b"POST /first HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
            b"POST /stalled HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{"
        )
        await _read_response(reader)
        deadline = time.monotonic() + 3
        while "/stalled" not in started and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        writer.close()
    assert "/stalled" in started, "never started: the connection was parked without a task or a timer"
    assert BODY_GRACE_S - 0.05 <= started["/stalled"] - sent < BODY_GRACE_S + 0.5
