"""Frames, not tokens: the text chunks an engine has ready together go to the bus as one Delta.

The engine runs in a task of its own that only appends to a buffer; the sender
takes everything buffered each time it runs. A chunk is never held back to wait
for more (the sender sends what is there the moment it can), but when the
engine produced several chunks meanwhile (a batch's decode step, or a busy
loop), the gateway gets one frame to decode instead of one per token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from daemon.engine.base import Event, TextChunk

# A bound on one merged frame (far below the gateway's per-frame byte limit for any real text).
MAX_CHUNKS_PER_FRAME = 256


def merge(chunks: list[TextChunk]) -> TextChunk:
    if len(chunks) == 1:
        return chunks[0]
    return TextChunk(
        text="".join(c.text for c in chunks),
        tokens=sum(c.tokens for c in chunks),
        tool_calls=tuple(call for c in chunks for call in c.tool_calls),
        logprobs=tuple(lp for c in chunks for lp in c.logprobs),
        token_ids=tuple(i for c in chunks for i in c.token_ids),
        reasoning="".join(c.reasoning for c in chunks),
    )


def _take(buffer: deque[Event]) -> Event:
    """The next event, with the text chunks after it that can join it merged in."""
    head = buffer.popleft()
    if not isinstance(head, TextChunk):
        return head
    run = [head]
    calls, text = bool(head.tool_calls), bool(head.text)
    while buffer and len(run) < MAX_CHUNKS_PER_FRAME:
        nxt = buffer[0]
        if not isinstance(nxt, TextChunk) or calls or (text and nxt.reasoning):
            break
        buffer.popleft()
        run.append(nxt)
        calls, text = bool(nxt.tool_calls), text or bool(nxt.text)
    return merge(run)


# A Delta renders its reasoning, then its text, then its tool calls: so a merge never puts
# anything after a chunk's tool calls, nor reasoning after text.


class _Ready:
    """`asyncio.Event` for its one waiter (the sender), set once per token: no loop lookup and no
    deque of waiters per wait."""

    __slots__ = ("_loop", "_waiter", "flag")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self.flag = False

    def set(self) -> None:
        self.flag = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        if self.flag:
            return
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None


async def coalesced(events: AsyncIterator[Event], *, gather_s: float = 0.0) -> AsyncIterator[Event]:
    """`events` with the text chunks that were ready at the same time merged (their order kept).

    `gather_s` > 0 (a whole answer, whose buyer sees nothing before the end): after a frame, the
    next one waits until that long has passed, gathering what comes meanwhile. The end of the
    answer is never held back.
    """
    buffer: deque[Event] = deque()
    loop = asyncio.get_running_loop()
    ready = _Ready(loop)
    ended = False
    failure: BaseException | None = None

    async def produce() -> None:
        nonlocal ended, failure
        try:
            async for event in events:
                buffer.append(event)
                ready.set()
        except Exception as exc:
            failure = exc
        finally:
            ended = True
            ready.set()

    async def gather_until(when: float) -> None:
        while not ended and (left := when - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await ready.wait()
            ready.flag = False

    producer = asyncio.create_task(produce(), name="engine-events")
    try:
        sent_at = loop.time()
        while True:
            await ready.wait()
            ready.flag = False
            if gather_s > 0:
                await gather_until(sent_at + gather_s)
            while buffer:
                yield _take(buffer)
            sent_at = loop.time()
            if ended:
                if failure is not None:
                    raise failure
                return
    finally:
        if not producer.done():
            producer.cancel()
        # The engine's own cleanup (telling its worker to stop) runs before the request's task ends.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await producer
