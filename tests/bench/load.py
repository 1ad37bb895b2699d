"""The ways one request is sent (direct to the engine, or via a gateway, streamed or not) and the load driver."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import msgspec

from daemon.engine.base import CancelToken, EngineError, Finished, TextChunk
from daemon.engine.synthetic import SyntheticEngine
from schemas import bus
from tests.bench.lean_http import LeanClients, LeanHttpError, Target
from tests.bench.prompts import MESSAGES
from tests.bench.wire import COMPLETION, Events, error_code


@dataclass(frozen=True, slots=True)
class Sample:
    """One request as the client saw it. Times are time.perf_counter() seconds."""

    start: float
    end: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    error: str | None = None
    # The answer's x-request-id (None if none came: refused before any server, or no such header).
    request_id: str | None = None
    # Content chunks (SSE events with text) of a streamed answer: one per provider frame.
    chunks: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def latency_s(self) -> float:
        """The whole request: from sending it to the end of the response body."""
        return self.end - self.start

    @property
    def decode_tps(self) -> float | None:
        """Tokens after the first over the time after the first."""
        if self.first is None or self.last is None or self.tokens < 2 or self.last <= self.first:
            return None
        return (self.tokens - 1) / (self.last - self.first)


@dataclass(frozen=True, slots=True)
class Level:
    """All measured requests of one (path, concurrency) run."""

    concurrency: int
    samples: list[Sample]
    wall_s: float
    # CPU seconds this (the client's) process used meanwhile.
    cpu_s: float

    @staticmethod
    def merge(parts: list[Level]) -> Level:
        """Several rounds at the same concurrency as one level: samples pooled, wall and CPU time summed."""
        if not parts or len({p.concurrency for p in parts}) != 1:
            raise ValueError("merge needs at least one level, all at the same concurrency")
        return Level(
            parts[0].concurrency,
            [s for p in parts for s in p.samples],
            sum(p.wall_s for p in parts),
            sum(p.cpu_s for p in parts),
        )


def warmup(concurrency: int) -> int:
    """Unmeasured requests before a level: one round at its concurrency (also opens every pooled connection)."""
    return max(4, concurrency)


# Called with the index of the closed-loop worker that sends the request.
OneRequest = Callable[[int], Awaitable[Sample]]


def _settle_heap() -> None:
    """Keep this process's garbage collector out of the next measured load.

    Python's full collections walk every object the process holds, so they grow with what a benchmark
    has kept so far (every earlier series' samples): in `hotpath`, 4 of them took 18-90 ms each, and
    one landed inside a 0.6 s series (a tenth of it). That is the client's pause, not the server's
    cost, and it falls on whichever series is running. Freezing what exists now takes it out of every
    later collection (young garbage is still collected as usual); the cost is that cycles among those
    objects are never freed, which a benchmark's few minutes do not notice.
    """
    gc.freeze()


async def drive(one: OneRequest, *, concurrency: int, requests: int) -> Level:
    """Run `requests` requests keeping `concurrency` of them in flight (closed loop)."""
    _settle_heap()
    counter = itertools.count()
    samples: list[Sample] = []
    cpu = time.process_time()

    async def worker(w: int) -> None:
        while next(counter) < requests:
            samples.append(await one(w))

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for w in range(min(concurrency, requests)):
            tg.create_task(worker(w))
    wall = time.perf_counter() - started
    return Level(concurrency, samples, wall, time.process_time() - cpu)


async def drive_for(one: OneRequest, *, concurrency: int, seconds: float, workers_from: int = 0) -> Level:
    """Keep `concurrency` requests in flight for `seconds` (closed loop), then let the running ones finish."""
    until = time.perf_counter() + seconds
    return await drive_while(
        one, concurrency=concurrency, going=lambda: time.perf_counter() < until, workers_from=workers_from
    )


async def drive_while(one: OneRequest, *, concurrency: int, going: Callable[[], bool], workers_from: int = 0) -> Level:
    """Keep `concurrency` requests in flight while `going()`, then let the running ones finish.

    `workers_from` offsets the worker indexes (so two loads side by side use different client pools).
    """
    _settle_heap()
    samples: list[Sample] = []
    cpu = time.process_time()
    started = time.perf_counter()

    async def worker(w: int) -> None:
        while going():
            samples.append(await one(w))

    async with asyncio.TaskGroup() as tg:
        for w in range(concurrency):
            tg.create_task(worker(workers_from + w))
    wall = time.perf_counter() - started
    return Level(concurrency, samples, wall, time.process_time() - cpu)


# ---- direct: the engine alone, in this process -------------------------------------------


class Direct:
    """Baseline: `prepare()` + `generate()` on an in-process SyntheticEngine (no HTTP, no NATS)."""

    def __init__(self, max_tokens: int) -> None:
        self.engine = SyntheticEngine("synthetic")
        self.max_tokens = max_tokens
        self._ids = itertools.count()

    async def __call__(self, _: int) -> Sample:
        request = bus.InferenceRequest(
            request_id=f"bench-direct-{next(self._ids)}",
            model=self.engine.model_id,
            messages=[bus.BusMessage(role=r, content=c) for r, c in MESSAGES],
            params=bus.SamplingParams(max_tokens=self.max_tokens),
            deadline_ms=int((time.time() + 600) * 1000),
        )
        start = time.perf_counter()
        first: float | None = None
        last: float | None = None
        tokens = 0
        finished: Finished | None = None
        try:
            prepared = await self.engine.prepare(request)
            async for event in self.engine.generate(prepared, CancelToken()):
                if isinstance(event, TextChunk):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    last = now
                    tokens += event.tokens
                else:
                    finished = event
        except EngineError as exc:
            return Sample(start, time.perf_counter(), first, last, tokens, f"engine:{exc.code}")
        end = time.perf_counter()
        error = _check(finished.finish_reason if finished else None, tokens, self.max_tokens)
        if error is None and finished is not None and finished.completion_tokens != tokens:
            error = "usage_mismatch"
        return Sample(start, end, first, last, tokens, error)


# ---- via gateway: HTTP + SSE through the control plane, NATS and the daemon ---------------


class HttpClients:
    """httpx.AsyncClients (HTTP/1.1, keep-alive) with one pooled connection per concurrent stream.

    Worker w uses client w // streams_per_client. One shared pool would do, but
    httpcore re-scans every queued request against every pooled connection on
    each request start and end (encode/httpx#3215): with one 64-connection pool
    that scan alone keeps the benchmark client on a whole core, and the "via
    gateway" column would measure httpx instead of the gateway. Sharding the
    pool keeps each scan small; `--streams-per-client 0` uses a single pool.
    """

    def __init__(self, concurrency: int, streams_per_client: int, *, timeout_s: float = 120.0) -> None:
        per = streams_per_client if streams_per_client > 0 else max(concurrency, 1)
        self.per_client = per
        self.clients = [
            httpx.AsyncClient(
                http2=False,
                # An idle connection is dropped before the server drops it (uvicorn: after 5 s): reusing
                # one just as the server closes it fails the request (ReadError) for no fault of either.
                limits=httpx.Limits(max_connections=per, max_keepalive_connections=per, keepalive_expiry=4.0),
                timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s), pool=timeout_s),
            )
            for _ in range(-(-max(concurrency, 1) // per))
        ]

    def for_worker(self, worker: int) -> httpx.AsyncClient:
        return self.clients[(worker // self.per_client) % len(self.clients)]

    async def __aenter__(self) -> HttpClients:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients:
            await client.aclose()


class _Streamed:
    """What a streamed answer's bytes said, read as they arrive (the same for either client)."""

    __slots__ = ("chunks", "events", "failure", "finish", "first", "last", "usage")

    def __init__(self) -> None:
        self.events = Events()
        self.first: float | None = None
        self.last: float | None = None
        # Content chunks (SSE events with text) so far.
        self.chunks = 0
        self.usage: int | None = None
        self.finish: str | None = None
        self.failure: str | None = None

    def feed(self, data: bytes, now: float) -> None:
        """Read `data`, which arrived at `now`; after a failure (an in-band error, a bad chunk) nothing more."""
        if self.failure is not None:
            return
        try:
            chunks = self.events.feed(data)
        except msgspec.DecodeError:
            self.failure = "client:bad_sse_chunk"
            return
        for chunk in chunks:
            if chunk.error is not None:
                self.failure = f"in_band:{chunk.error.code or '?'}"
                return
            if chunk.usage is not None:
                self.usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    if self.first is None:
                        self.first = now
                    self.last = now
                    # A delta holds the tokens of one provider frame (one or more): the usage chunk counts them.
                    self.chunks += 1
                if choice.finish_reason is not None:
                    self.finish = choice.finish_reason

    def sample(self, start: float, end: float, request_id: str | None, max_tokens: int) -> Sample:
        if self.failure is not None:
            return Sample(start, end, self.first, self.last, self.chunks, self.failure, request_id)
        # The usage chunk counts the tokens; there can be no more content chunks than tokens.
        tokens = self.usage or 0
        error = "no_done_marker" if not self.events.done else _check(self.finish, tokens, max_tokens)
        if error is None and (self.usage is None or not 0 < self.chunks <= self.usage):
            error = "usage_mismatch"
        return Sample(start, end, self.first, self.last, tokens, error, request_id, self.chunks)


def _whole(start: float, end: float, body: bytes, request_id: str | None, max_tokens: int) -> Sample:
    """A whole answer's 200 body, checked."""
    try:
        completion = COMPLETION.decode(body)
    except msgspec.DecodeError:
        return Sample(start, end, error="client:bad_json", request_id=request_id)
    tokens = completion.usage.completion_tokens if completion.usage is not None else 0
    if completion.usage is None:
        return Sample(start, end, tokens=tokens, error="no_usage", request_id=request_id)
    if len(completion.choices) != 1 or not completion.choices[0].message.content:
        return Sample(start, end, tokens=tokens, error="no_content", request_id=request_id)
    error = _check(completion.choices[0].finish_reason, tokens, max_tokens)
    return Sample(start, end, tokens=tokens, error=error, request_id=request_id)


class ViaGateway:
    """POST /v1/chat/completions: streamed (timed from sending to each content token), or not (`stream=False`).

    With `LeanClients` (tests/bench/lean_http.py) the request costs this process a fraction of what httpx
    does; `HttpClients` is httpx, as a buyer's SDK is.
    """

    def __init__(
        self,
        clients: HttpClients | LeanClients,
        base_url: str,
        api_key: str,
        model: str,
        max_tokens: int,
        *,
        stream: bool = True,
    ) -> None:
        self.clients = clients
        self.url = f"{base_url}/v1/chat/completions"
        self.max_tokens = max_tokens
        self.stream = stream
        self.headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
        body: dict[str, object] = {
            "model": model,
            "messages": [{"role": r, "content": c} for r, c in MESSAGES],
            "max_tokens": max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        self.body = msgspec.json.encode(body)
        self.target = Target(self.url, self.body, self.headers) if isinstance(clients, LeanClients) else None

    async def __call__(self, worker: int) -> Sample:
        if isinstance(self.clients, LeanClients):
            return await self._lean(self.clients, worker)
        if not self.stream:
            return await self._whole(self.clients, worker)
        client = self.clients.for_worker(worker)
        start = time.perf_counter()
        reading = _Streamed()
        rid: str | None = None
        try:
            async with client.stream("POST", self.url, content=self.body, headers=self.headers) as response:
                rid = response.headers.get("x-request-id")
                if response.status_code != 200:
                    code = error_code(await response.aread())
                    return Sample(
                        start, time.perf_counter(), error=f"http_{response.status_code}:{code}", request_id=rid
                    )
                async for data in response.aiter_bytes():
                    reading.feed(data, time.perf_counter())
                    if reading.failure is not None:
                        break
        except httpx.HTTPError as exc:
            reading.failure = reading.failure or f"client:{type(exc).__name__}"
        return reading.sample(start, time.perf_counter(), rid, self.max_tokens)

    async def _whole(self, clients: HttpClients, worker: int) -> Sample:
        """A non-streamed request: only its end is observable (no TTFT); tokens are the usage's count."""
        client = clients.for_worker(worker)
        start = time.perf_counter()
        try:
            response = await client.post(self.url, content=self.body, headers=self.headers)
        except httpx.HTTPError as exc:
            return Sample(start, time.perf_counter(), error=f"client:{type(exc).__name__}")
        end = time.perf_counter()
        rid = response.headers.get("x-request-id")
        if response.status_code != 200:
            failure = f"http_{response.status_code}:{error_code(response.content)}"
            return Sample(start, end, error=failure, request_id=rid)
        return _whole(start, end, response.content, rid, self.max_tokens)

    async def _lean(self, clients: LeanClients, worker: int) -> Sample:
        assert self.target is not None
        start = time.perf_counter()
        reading = _Streamed() if self.stream else None
        try:
            answer = await clients.post(worker, self.target, reading.feed if reading is not None else None)
        except (LeanHttpError, TimeoutError) as exc:
            failure = f"client:{type(exc).__name__}"
            if reading is None:
                return Sample(start, time.perf_counter(), error=failure)
            reading.failure = reading.failure or failure
            return reading.sample(start, time.perf_counter(), None, self.max_tokens)
        end = time.perf_counter()
        if answer.status != 200:
            code = error_code(bytes(answer.body))
            return Sample(start, end, error=f"http_{answer.status}:{code}", request_id=answer.request_id)
        if reading is None:
            return _whole(start, end, bytes(answer.body), answer.request_id, self.max_tokens)
        return reading.sample(start, end, answer.request_id, self.max_tokens)


def _check(finish: str | None, tokens: int, max_tokens: int) -> str | None:
    """Both paths must end with finish_reason "length" after exactly max_tokens tokens."""
    if finish is None:
        return "no_finish"
    if finish != "length":
        return f"finish_{finish}"
    if tokens != max_tokens:
        return "short_stream"
    return None
