"""One streamed chat completion against a real model, as the buyer sees it: every content chunk's arrival time.

`load.ViaGateway` counts one token per delta (true of the synthetic engine only);
a real model's deltas carry one or more tokens, so here the token count is the
usage chunk's `completion_tokens` and the deltas are timed as chunks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import msgspec

from tests.bench.load import Sample
from tests.bench.wire import Events, error_code

# Called with (number of content chunks so far, the time.perf_counter() they arrived at).
OnChunk = Callable[[int, float], None]


@dataclass(slots=True)
class Streamed:
    """One streamed request. Times are time.perf_counter() seconds; chunks in one socket read share a time."""

    max_tokens: int
    start: float
    end: float = 0.0
    request_id: str = ""
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    usage_tokens: int | None = None
    done: bool = False
    # HTTP status, in-band error or client failure; None if the stream itself came through.
    transport_error: str | None = None

    @property
    def error(self) -> str | None:
        """Why the request failed, or None: it must end with [DONE], finish_reason=length and usage == max_tokens."""
        if self.transport_error is not None:
            return self.transport_error
        if not self.done:
            return "no_done_marker"
        if self.finish is None:
            return "no_finish"
        if self.finish != "length":
            return f"finish_{self.finish}"
        if self.usage_tokens is None:
            return "no_usage"
        if self.usage_tokens != self.max_tokens:
            return "usage_not_max_tokens"
        return None

    def sample(self) -> Sample:
        """As load.Sample (tokens: the usage count), for report.Stats."""
        first = self.chunk_times[0] if self.chunk_times else None
        last = self.chunk_times[-1] if self.chunk_times else None
        return Sample(self.start, self.end, first, last, self.usage_tokens or 0, self.error)


async def stream_chat(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    body: bytes,
    max_tokens: int,
    on_chunk: OnChunk | None = None,
) -> Streamed:
    """POST a `stream: true` chat completion and read it to the end, timing each content chunk as it is read."""
    result = Streamed(max_tokens=max_tokens, start=time.perf_counter())
    parts: list[str] = []
    events = Events()
    try:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            result.request_id = response.headers.get("x-request-id", "")
            if response.status_code != 200:
                result.transport_error = f"http_{response.status_code}:{error_code(await response.aread())}"
                return result
            async for data in response.aiter_bytes():
                now = time.perf_counter()
                for chunk in events.feed(data):
                    if chunk.error is not None:
                        result.transport_error = f"in_band:{chunk.error.code or '?'}"
                        return result
                    if chunk.usage is not None:
                        result.usage_tokens = chunk.usage.completion_tokens
                    for choice in chunk.choices:
                        if choice.delta.content:
                            parts.append(choice.delta.content)
                            result.chunk_times.append(now)
                            if on_chunk is not None:
                                on_chunk(len(result.chunk_times), now)
                        if choice.finish_reason is not None:
                            result.finish = choice.finish_reason
    except httpx.HTTPError as exc:
        result.transport_error = f"client:{type(exc).__name__}"
    except msgspec.DecodeError:
        result.transport_error = "client:bad_sse_chunk"
    finally:
        result.end = time.perf_counter()
        result.done = events.done
        result.text = "".join(parts)
    return result


def chat_request(prompt: str, max_tokens: int, *, model: str) -> dict[str, object]:
    """A greedy (temperature 0) streamed chat request with one user message (no conversation key to route by)."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def chat_body(prompt: str, max_tokens: int, *, model: str) -> bytes:
    """`chat_request` as the bytes to POST."""
    return msgspec.json.encode(chat_request(prompt, max_tokens, model=model))
