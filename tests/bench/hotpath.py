"""`python3 -m tests.bench hotpath` (`just bench hotpath`): the gateway's hot path, side by side in one run.

One nats-server, one PostgreSQL, one synthetic daemon and two control planes
(MP_METERING=off and =on). Each column is one kind of load; each row a figure.
The series, in rounds whose order rotates so drift falls on all alike:

  off, 1 key      metering off: the baseline for "metering on vs off"
  on, 1 key       metering on, every request on one account (one quota row, one lease)
  on, N keys      metering on, worker w uses key w % N (N = concurrency): one quota row per worker (its own
                  gateway, configured as "on, 1 key"'s: what N subjects leave behind stays out of that one)

Goals this prints beside the figures (issue 14): one key at c=64 no slower than
64 keys (p50 within 1.2x), metering on vs off within 10% requests/s, gateway
CPU per streamed / non-streamed request, and the time a gateway adds to the
first token at c=1, against the full-speed synthetic engine (64 tokens, and 1 token: the
gateway's hops without the rest of the answer contending for the cores) and against a daemon
that paces its tokens as a provider does (2 ms each; not with --quick). With --profile, py-spy samples the
metering-on gateway during its one-key rounds and the top functions are printed.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import psutil

from infra.components import Child, DaemonChild, start_daemon, wait_model
from services.keys.store import create_account, create_key
from tests.bench import cli, harness
from tests.bench.cpu import CpuProbe
from tests.bench.harness import Verdict
from tests.bench.lean_http import LeanClients
from tests.bench.lease_grants import SHORT, GrantProbe
from tests.bench.load import Direct, HttpClients, Level, OneRequest, Sample, ViaGateway, drive, warmup
from tests.bench.machine import machine_lines, speed_ms
from tests.bench.progress import say
from tests.bench.report import Stats
from tests.bench.stack import RAISED_QUOTAS, GatewaySpec
from tests.bench.synthetic import MODEL_ID, SyntheticStack
from tests.bench.table import Table, counts, ms, rate
from tests.bench.timeline import frames_by_request, frames_per_request, timeline

OFF = "metering-off"
ON = "metering-on"
# The slow daemon claims 4,096 slots; the gateways' cap on what one provider may claim is 64 by default.
# Logs as the container image writes them (one JSON object per line), not the console format for people.
_SLOTS = {"MP_PROVIDER_MAX_SLOTS": "4096", "MP_LOG_FORMAT": "json"}
ON_PG = "metering-on-postgres"
# The N-keys series' own gateway, configured as ON: what 64 subjects leave behind them (their leases' upkeep
# and refills, the tail of their ledger batches: about 10-30 ms of CPU within the seconds after a series)
# fell in the next series of the same gateway, often "on, 1 key", and in its CPU per request (+0.014 ms per
# 8-token-a-step stream at c=64 in 16 paired rounds, 2026-12-08), a history metering off never has.
ON_KEYS = "metering-on-keys"
_ON = {**RAISED_QUOTAS, **_SLOTS, "MP_METERING": "on", "MP_SETTLEMENT": "jetstream"}
GATEWAYS = (
    GatewaySpec(OFF, {**RAISED_QUOTAS, **_SLOTS, "MP_METERING": "off"}),
    GatewaySpec(ON, _ON),
    GatewaySpec(ON_KEYS, _ON),
    GatewaySpec(ON_PG, {**RAISED_QUOTAS, **_SLOTS, "MP_METERING": "on", "MP_SETTLEMENT": "postgres"}),
)
DIRECT = "direct engine"
# The same requests straight to the daemon's own OpenAI API (how gateways' overhead is usually measured:
# the same client, the upstream called directly).
DIRECT_HTTP = "direct HTTP"
SERIES = ("off, 1 key", "on, 1 key", "on, N keys")
# Metering on with each request's reservation and settlement written straight to Postgres (group
# commit), the path before the usage stream: beside "on, 1 key" it shows what the stream changed.
PG_SERIES = "on, Postgres settle"
# A second daemon whose synthetic engine hands over this many tokens per step (a batch's decode step).
BATCH_MODEL = "synthetic-batch"
BATCH_STEP = 8
# A daemon that hands over a token every 2 ms (500 tokens/s, faster than any Mac serves one stream): time to
# first token at c=1 as a buyer of a real provider meets it, without the full-speed engine's 14k tokens/s
# taking the cores from the gateway and client while the first token is on its way. Short answers, and
# fewer requests per series, keep the column to about a minute.
PACED_MODEL = "synthetic-paced"
PACED_TOKEN_DELAY_S = 0.002
PACED_TOKENS = 16
PACED_REQUESTS = 256
# Measured requests per series of a concurrent column (c=64 streams, c=16 whole answers), where --requests does
# not say: 512 per round. A round of 128 (the c=1 columns' size) lasts a fifth of a second there and measures
# its own ramp: c requests arriving together at a gateway that sat idle while the other series ran, then the
# last ones finishing at falling concurrency, with the ledger's lingering batch of the series before. On
# 2026-12-07, back to back, 2048 instead of 512 gave 0.716 instead of 0.977 ms of metering-on gateway CPU
# per 64-token stream at c=64 (off 0.676 / 0.741), and on/off rounds of 0.91-1.01 instead of 0.60-1.01.
# Six rounds of 512 (ROUNDS): the on/off goal is judged on the median of the rounds' paired ratios.
CONCURRENT_REQUESTS = 3072
ROUNDS = 6
# A third one that answers slowly (a token a second), for the many-streams-at-once measurement.
SLOW_MODEL = "synthetic-slow"
SLOW_TOKEN_DELAY_S = 1.0
SLOW_TOKENS = 5
SLOW_RAMP_PER_S = 100


@dataclass(frozen=True, slots=True)
class Column:
    stream: bool
    concurrency: int
    model: str = MODEL_ID
    # max_tokens and measured requests per series, where not the plan's.
    tokens: int | None = None
    requests: int | None = None

    @property
    def label(self) -> str:
        kind = "stream" if self.stream else "non-stream"
        if self.model == PACED_MODEL:
            return f"{kind} c={self.concurrency}, {PACED_TOKEN_DELAY_S * 1000:g} ms/token"
        step = f", {BATCH_STEP} tok/step" if self.model == BATCH_MODEL else ""
        only = ", 1 token" if self.tokens == 1 else ""
        return f"{kind} c={self.concurrency}{step}{only}"


@dataclass
class Tally:
    levels: list[Level] = field(default_factory=list)
    gateway_cpu_s: float | None = 0.0
    postgres_cpu_s: float | None = 0.0
    nats_cpu_s: float | None = 0.0
    # Where the time to first token went, p50 per part (tests/bench/timeline.py); streams at c=1 only.
    timeline: dict[str, float] | None = None
    # Delta frames the gateway received per request (its summary lines), for the series through one.
    frames: float | None = None
    # The fixed workload's time (tests/bench/machine.py) right after the column's rounds: the box's speed then.
    speed_ms: float | None = None
    # Quota lease statements its metered gateway ran in the series' rounds, by what ran short (lease_grants.py).
    grants: dict[str, float] | None = None

    @property
    def stats(self) -> Stats:
        return Stats.of(Level.merge(self.levels))

    @property
    def samples(self) -> list[Sample]:
        return [x for lev in self.levels for x in lev.samples]

    @property
    def gateway_ms_per_request(self) -> float | None:
        """Its gateway's CPU over its rounds per request, in ms (None for a series through no gateway)."""
        if self.gateway_cpu_s is None:
            return None
        return 1000 * self.gateway_cpu_s / max(1, sum(len(lev.samples) for lev in self.levels))


@dataclass
class Plan:
    columns: tuple[Column, ...]
    tokens: int
    requests: int
    rounds: int
    profile_s: float
    slow_streams: int = 0
    # Which column's one-key rounds py-spy samples (0: the first).
    profile_column: int = 1
    # PostgreSQL with fsync and synchronous commit on, as in production (off by default, as in the tests).
    durable_postgres: bool = False
    streams_per_client: int = 8
    # The load's client is httpx (h11 and anyio, as a buyer's SDK) rather than the lean one (lean_http.py).
    httpx_client: bool = False

    def clients(self, concurrency: int) -> HttpClients | LeanClients:
        """One series' client: its own connections, one per worker."""
        return HttpClients(concurrency, self.streams_per_client) if self.httpx_client else LeanClients()


class HotStack(SyntheticStack):
    """The synthetic stack plus a daemon whose engine hands over BATCH_STEP tokens per step."""

    def start_daemons(self) -> None:
        super().start_daemons()
        batch = self._synthetic("batch", BATCH_MODEL, {"MP_SYNTHETIC_TOKENS_PER_STEP": str(BATCH_STEP)})
        slow = self._synthetic(
            "slow", SLOW_MODEL, {"MP_SYNTHETIC_TOKEN_DELAY_S": str(SLOW_TOKEN_DELAY_S), "MP_SYNTHETIC_SLOTS": "4096"}
        )
        self.paced = self._synthetic("paced", PACED_MODEL, {"MP_SYNTHETIC_TOKEN_DELAY_S": str(PACED_TOKEN_DELAY_S)})
        self.extra = [batch, slow, self.paced]
        for gateway in self.gateways.values():
            for daemon, model in ((batch, BATCH_MODEL), (slow, SLOW_MODEL), (self.paced, PACED_MODEL)):
                wait_model(gateway.base_url, model, timeout=60, daemon=daemon)

    def _synthetic(self, name: str, model: str, env: dict[str, str]) -> DaemonChild:
        """Another synthetic daemon, serving `model` with `env`; stopped with the stack."""
        daemon = start_daemon(
            self.home,
            nats=self.nats_url,
            provider_id=f"bench-synthetic-{name}",
            model_id=model,
            engine="synthetic",
            env=env,
        )
        self.on_stop(daemon.name, daemon.stop)
        return daemon

    def children(self) -> list[Child]:
        return [*super().children(), *getattr(self, "extra", [])]


@dataclass
class SlowStreams:
    """N slow streams held open together on the metering-on gateway: did they all finish, at what cost."""

    level: Level
    peak_open: int
    rss_before: int
    rss_peak: int
    rss_after: int
    cpu_s: float | None


async def slow_streams(n: int, stack: SyntheticStack, api_key: str, clients: HttpClients | LeanClients) -> SlowStreams:
    """Open N streams at SLOW_RAMP_PER_S (a thundering herd measures admission, not holding), each
    long enough that all N are open together at the end of the ramp."""
    gateway = stack.gateways[ON]
    proc = psutil.Process(gateway.child.proc.pid)
    probe = CpuProbe(gateway.child.proc.pid)
    rss_before = proc.memory_info().rss
    peak_rss, open_now, peak_open = rss_before, 0, 0
    running = True

    async def sample() -> None:
        nonlocal peak_rss
        while running:
            peak_rss = max(peak_rss, proc.memory_info().rss)
            await asyncio.sleep(0.1)

    async with clients:
        tokens = math.ceil(n / SLOW_RAMP_PER_S / SLOW_TOKEN_DELAY_S) + SLOW_TOKENS
        send = ViaGateway(clients, gateway.base_url, api_key, SLOW_MODEL, tokens)

        async def one(w: int) -> Sample:
            nonlocal open_now, peak_open
            await asyncio.sleep(w / SLOW_RAMP_PER_S)
            open_now += 1
            peak_open = max(peak_open, open_now)
            try:
                return await send(w)
            finally:
                open_now -= 1

        sampler = asyncio.create_task(sample())
        cpu0 = probe.snapshot()
        started = time.perf_counter()
        samples = await asyncio.gather(*(one(w) for w in range(n)))
        wall = time.perf_counter() - started
        cpu1 = probe.snapshot()
        running = False
        await sampler
    await asyncio.sleep(1.0)  # settled, buffers freed
    level = Level(n, list(samples), wall, 0.0)
    return SlowStreams(level, peak_open, rss_before, peak_rss, proc.memory_info().rss, CpuProbe.used(cpu0, cpu1))


async def _accounts(database_url: str, n: int) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        keys = []
        for i in range(n):
            account = await create_account(conn, f"bench-{i}-{time.monotonic_ns()}")
            key, _ = await create_key(conn, account, name="bench")
            keys.append(key)
        return keys
    finally:
        await conn.close()


class ManyKeys:
    """Worker w sends with key w % len(keys)."""

    def __init__(self, sends: Sequence[ViaGateway]) -> None:
        self.sends = sends

    async def __call__(self, worker: int) -> Sample:
        return await self.sends[worker % len(self.sends)](worker)


class Profiler:
    """py-spy on one process, collapsed stacks (`--format raw`) summed over the rounds it is started for."""

    def __init__(self, pid: int, directory: Path) -> None:
        self.pid = pid
        self.directory = directory
        self.files: list[Path] = []
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("py-spy")
        if exe is None:
            return
        out = self.directory / f"profile-{len(self.files)}.txt"
        self.files.append(out)
        self._proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(self.pid),
                "--format",
                "raw",
                "--rate",
                "200",
                "--nonblocking",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # attached before the round starts

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None

    def top(self, n: int = 15) -> list[str]:
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        for path in self.files:
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                frames = stack.split(";")
                # The event loop's idle wait is not work.
                if "select (selectors.py" in frames[-1] or ("_run_once" in frames[-1] and len(frames) < 4):
                    continue
                samples = int(count)
                total += samples
                own[_short(frames[-1])] += samples
                for name in {_short(f) for f in frames}:
                    inclusive[name] += samples
        if not total:
            return ["  (no samples: is py-spy installed and allowed to attach?)"]
        lines = [f"  busy samples: {total} (idle selector waits left out)", "  own time:"]
        lines += [f"    {100 * c / total:5.1f}%  {name}" for name, c in own.most_common(n)]
        lines.append("  inclusive (project code):")
        # Leaving out the frames every sample passes through (the server's main and loop).
        ours = [(k, c) for k, c in inclusive.most_common() if ("services/" in k or "schemas/" in k) and c < 0.8 * total]
        lines += [f"    {100 * c / total:5.1f}%  {name}" for name, c in ours[:n]]
        return lines


def _short(frame: str) -> str:
    # "fn (path/to/file.py:123)" -> "fn (file-relative path:line)" without the venv prefix.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/wt-hot/", "/main/", "python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})"


Results = dict[str, dict[str, Tally]]


Measured = tuple[Results, list[str], SlowStreams | None]


async def measure(plan: Plan, stack: SyntheticStack, profile_dir: Path) -> Measured:
    assert stack.postgres_pid is not None
    assert stack.nats_pid is not None
    top = max(c.concurrency for c in plan.columns)
    keys = await _accounts(stack.database_url, top)
    postgres = CpuProbe(stack.postgres_pid, tree=True)
    nats = CpuProbe(stack.nats_pid)
    gw = {name: stack.gateways[name] for name in (OFF, ON, ON_KEYS, ON_PG)}
    assert isinstance(stack.daemon, DaemonChild)
    # Each baseline model's daemon's own OpenAI API.
    daemon_api = {MODEL_ID: stack.daemon.api_url}
    if isinstance(stack, HotStack):
        daemon_api[PACED_MODEL] = stack.paced.api_url
    probes = {name: CpuProbe(g.child.proc.pid) for name, g in gw.items()}
    grant_probes = {name: GrantProbe(gw[name].base_url, stack.home) for name in (ON, ON_KEYS)}
    profiler = Profiler(gw[ON].child.proc.pid, profile_dir) if plan.profile_s else None
    results: Results = {}
    # (column label, series) -> the gateway it went through (None: a baseline).
    series_gateway: dict[tuple[str, str], str | None] = {}
    async with (
        plan.clients(top) as c_off,
        plan.clients(top) as c_one,
        plan.clients(top) as c_many,
        plan.clients(top) as c_pg,
        plan.clients(top) as c_direct,
        httpx.AsyncClient() as scraper,
    ):
        for column in plan.columns:
            c = column.concurrency
            tokens = column.tokens or plan.tokens

            def via(
                clients: HttpClients | LeanClients, name: str, key: str, column: Column = column, tokens: int = tokens
            ) -> ViaGateway:
                return ViaGateway(clients, gw[name].base_url, key, column.model, tokens, stream=column.stream)

            senders: dict[str, tuple[str | None, OneRequest]] = {
                SERIES[0]: (OFF, via(c_off, OFF, stack.api_key)),
                SERIES[1]: (ON, via(c_one, ON, stack.api_key)),
                SERIES[2]: (ON_KEYS, ManyKeys([via(c_many, ON_KEYS, k) for k in keys[:c]])),
                PG_SERIES: (ON_PG, via(c_pg, ON_PG, stack.api_key)),
            }
            if column.model in daemon_api:
                # The baselines: the daemon's own API over HTTP (same client, no gateway or NATS), and
                # the full-speed engine in this process (no HTTP either).
                api = daemon_api[column.model]
                http = ViaGateway(c_direct, api, "none", column.model, tokens, stream=column.stream)
                senders = {DIRECT_HTTP: (None, http), **senders}
                if column.stream and column.model == MODEL_ID:
                    senders = {DIRECT: (None, Direct(tokens)), **senders}
            for _, send in senders.values():
                await drive(send, concurrency=c, requests=warmup(c) * 2)
            names = list(senders)
            tallies = {s: Tally() for s in names}
            per_round = max(1, (column.requests or plan.requests) // plan.rounds)
            for r in range(plan.rounds):
                order = _paired(names[r % len(names) :] + names[: r % len(names)], r)
                for series in order:
                    name, send = senders[series]
                    tally = tallies[series]
                    profiling = (
                        profiler is not None
                        and series == SERIES[1]
                        and column == plan.columns[min(plan.profile_column, len(plan.columns) - 1)]
                    )
                    if profiling:
                        assert profiler is not None
                        profiler.start()
                    grant_probe = grant_probes.get(name) if name else None
                    leases0 = await grant_probe.snapshot(scraper) if grant_probe is not None else None
                    pg0, nats0 = postgres.snapshot(), nats.snapshot()
                    gw0 = probes[name].snapshot() if name else None
                    tally.levels.append(await drive(send, concurrency=c, requests=per_round))
                    pg1, nats1 = postgres.snapshot(), nats.snapshot()
                    gw1 = probes[name].snapshot() if name else None
                    if grant_probe is not None:
                        used = GrantProbe.used(leases0, await grant_probe.snapshot(scraper))
                        tally.grants = _sum(tally.grants if r else {}, used)
                    if profiling:
                        assert profiler is not None
                        profiler.stop()
                    tally.gateway_cpu_s = _add(tally.gateway_cpu_s, CpuProbe.used(gw0, gw1) if name else None)
                    tally.postgres_cpu_s = _add(tally.postgres_cpu_s, CpuProbe.used(pg0, pg1) if name else None)
                    tally.nats_cpu_s = _add(tally.nats_cpu_s, CpuProbe.used(nats0, nats1) if name else None)
                stack.check_alive()
            if column.stream and c == 1:
                for series in names:
                    name = senders[series][0]
                    if name is not None:
                        tallies[series].timeline = timeline(tallies[series].samples, gw[name].child.log_path)
            for series in names:
                st = tallies[series].stats
                why = f" ({counts(st.errors)})" if st.failed else ""
                done = f"{st.requests} requests, {st.wall_s:6.2f}s, {st.failed} failed{why}"
                say(f"{column.label:<24} {series:<13}: {done}")
            # The footer times the box before and after the run; a slow spell in between shows only here.
            speed = speed_ms(rounds=5)
            for tally in tallies.values():
                tally.speed_ms = speed
            results[column.label] = tallies
            series_gateway.update({(column.label, series): senders[series][0] for series in names})
    # Each gateway's log read once, at the end: its summary lines say how many frames each request came in.
    frames = {name: frames_by_request(g.child.log_path) for name, g in gw.items()}
    for (label, series), name in series_gateway.items():
        if name is not None:
            results[label][series].frames = frames_per_request(results[label][series].samples, frames[name])
    slow = (
        await slow_streams(plan.slow_streams, stack, stack.api_key, plan.clients(plan.slow_streams))
        if plan.slow_streams
        else None
    )
    return results, (profiler.top() if profiler is not None else []), slow


def _paired(order: list[str], r: int) -> list[str]:
    """A round's rotated order with metering on (one key) right after metering off in even rounds and right
    before it in odd ones: the pair the on/off goal compares runs back to back, seconds apart at most, and
    each goes first as often as the other."""
    if SERIES[0] not in order or SERIES[1] not in order:
        return order
    order = [s for s in order if s != SERIES[1]]
    at = order.index(SERIES[0]) + (1 if r % 2 == 0 else 0)
    return [*order[:at], SERIES[1], *order[at:]]


def paired_ratios(on: Tally, off: Tally) -> list[float]:
    """The on/off requests/s ratio of each round (the two series ran back to back: `_paired`)."""
    ratios = []
    for a, b in zip(on.levels, off.levels, strict=False):
        on_rps, off_rps = Stats.of(a).requests_per_s, Stats.of(b).requests_per_s
        if off_rps:
            ratios.append(on_rps / off_rps)
    return ratios


def on_off(on: Tally, off: Tally) -> str:
    """Metering on / off requests/s: the median of the rounds' paired ratios (the figure the goal is judged
    on), their range, and the ratio of all requests pooled.

    On a shared machine a single run's pooled ratio moves by more than a change under test: a slow spell of
    the machine (the fixed workload's time moves by a third within a run) that falls on one series of one
    round moves it (the pooled ratio is total requests over total time). The median of the rounds' own
    ratios compares series that ran back to back, and a spell on one round moves it little."""
    pooled = f"{on.stats.requests_per_s / off.stats.requests_per_s:.2f}x" if off.stats.requests_per_s else "-"
    ratios = paired_ratios(on, off)
    if len(ratios) < 2:
        return f"{pooled} (pooled)"
    return (
        f"{statistics.median(ratios):.2f}x median of {len(ratios)} paired rounds"
        f" [{min(ratios):.2f}-{max(ratios):.2f}; pooled {pooled}]"
    )


def _sum(total: dict[str, float] | None, used: dict[str, float] | None) -> dict[str, float] | None:
    if total is None or used is None:
        return None
    return {k: total.get(k, 0.0) + used[k] for k in SHORT}


def _add(total: float | None, used: float | None) -> float | None:
    return None if total is None or used is None else total + used


def _client_lines(plan: Plan) -> list[str]:
    if plan.httpx_client:
        return [
            "client: httpx (--httpx), as a buyer's SDK: about 1.1 ms of this machine's CPU per 64-token stream, taken",
            "        from the gateway, NATS and the daemon it measures (and from the direct baseline's daemon alike)",
        ]
    return [
        "client: lean (tests/bench/lean_http.py: httptools on an asyncio protocol, one keep-alive connection per",
        "        worker, on uvloop), about 0.2 ms of CPU per 64-token stream; every series, baselines included,",
        "        uses it; --httpx measures with httpx instead",
    ]


def render(plan: Plan, measured: Measured, tail: list[str]) -> str:
    results, profile, slow = measured
    header = [
        f"mac-provider hot-path benchmark ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})",
        "",
        "ENGINE: the SYNTHETIC stand-in (one token per step, as fast as it can): these numbers measure the serving",
        "        path, not a model. Three control planes on one NATS + PostgreSQL (metering off, on, on with",
        "        Postgres settlement), and three",
        f"        daemons: {MODEL_ID!r} (1 token per step) and {BATCH_MODEL!r} ({BATCH_STEP} tokens per step, as a",
        "        batch's decode step hands over; the daemon puts the tokens ready together in one frame); and",
        f"        {PACED_MODEL!r}, a token every {PACED_TOKEN_DELAY_S * 1000:g} ms (a provider's pace, not the"
        f" stand-in's full speed), max_tokens={PACED_TOKENS}.",
        "columns: 'stream c=1, 1 token' = max_tokens 1 at full speed: the gateway's hops to the first token",
        "        without the rest of the answer; at 64 tokens the other 63 follow the first within about 1.5 ms and",
        "        take the 2 cores from its way out (`perf sched`: woken NATS and gateway threads queued for a whole",
        "        1.4 ms slice behind the daemon's burst while the other core idled).",
        f"series: '{DIRECT}' = the same engine in the benchmark process (no HTTP, NATS or gateway); '{DIRECT_HTTP}' =",
        "        the same requests, same client, straight to the daemon's own OpenAI API (no gateway, no NATS): the",
        "        baseline a gateway's added latency is measured against;",
        "        'off, 1 key' = metering off; 'on, 1 key' = metering on, every request on one account (one quota",
        "        row); 'on, N keys' = worker w uses key w % N, N = the column's concurrency (one quota row each;",
        "        on a gateway of its own, configured alike, so what N subjects leave behind is not in 'on, 1 key');",
        f"        '{PG_SERIES}' = metering on, 1 key, reservations and settlements straight to PostgreSQL",
        "        (MP_SETTLEMENT=postgres) instead of through the usage stream (JetStream; the default).",
        f"load: POST /v1/chat/completions, max_tokens={plan.tokens}, closed loop; {plan.requests} measured requests",
        f"      per column and series in {plan.rounds} rounds whose order rotates ('{SERIES[0]}' and",
        f"      '{SERIES[1]}' back to back, in turn first); after a warm-up of each;",
        f"      {_many(plan)} per series where requests run at once (c > 1), so that a round is not mostly its ramp.",
        *_client_lines(plan),
        "postgres: "
        + (
            "fsync and synchronous_commit ON (--durable-postgres): every commit waits for its WAL flush, as in"
            " production"
            if plan.durable_postgres
            else "fsync OFF (as in the tests): a commit costs no disk flush; --durable-postgres measures with it"
        ),
        *machine_lines(
            "the client, the three control planes, nats-server (one Go P: infra/nats.py), daemons and PostgreSQL"
        ),
    ]
    figures = (
        "requests",
        "failed",
        "p50 ms",
        "p99 ms",
        "TTFT p50",
        "TTFT p99",
        "req/s",
        "frames/req",
        "chunks/req",
        "gw CPU/req",
        "gw µs/frame",
        "PG CPU/req",
        "NATS CPU/req",
    )
    table = Table(header, label=40, cell=10, columns=len(figures))
    table.row("column / series", figures)
    table.rule()
    for label, tallies in results.items():
        for series, t in tallies.items():
            st = t.stats
            n = max(1, len(t.samples))
            counted = [x.chunks for x in t.samples if x.ok and x.chunks]
            chunks = sum(counted) / len(counted) if counted and series not in (DIRECT, DIRECT_HTTP) else None
            gw_req = t.gateway_ms_per_request
            table.row(
                f"{label} / {series}",
                [
                    str(st.requests),
                    str(st.failed),
                    ms(st.latency_p50_ms),
                    ms(st.latency_p99_ms),
                    ms(st.ttft_p50_ms),
                    ms(st.ttft_p99_ms),
                    rate(st.requests_per_s),
                    "-" if t.frames is None else f"{t.frames:.1f}",
                    "-" if chunks is None else f"{chunks:.1f}",
                    ms(gw_req),
                    # Streams of more than one frame only: one frame's figure would just repeat its request's.
                    f"{1000 * gw_req / t.frames:.1f}"
                    if gw_req is not None and t.frames and t.frames > 1 and chunks
                    else "-",
                    "-" if t.postgres_cpu_s is None else ms(1000 * t.postgres_cpu_s / n),
                    "-" if t.nats_cpu_s is None else ms(1000 * t.nats_cpu_s / n),
                ],
            )
        table.rule()
    speeds = [(label, next(iter(tallies.values())).speed_ms) for label, tallies in results.items()]
    table.add(
        "the fixed workload right after each column (the footer times it before and after the run; a column well",
        "above those ran in a slow spell of the box, metering off and on alike):",
        *(f"  {label:<28} {speed:.1f} ms" for label, speed in speeds if speed is not None),
    )
    table.add("goals (issue 14)")
    # The columns whose added time to first token is a goal: streamed at c=1, at full speed and paced.
    c1_labels = {c.label for c in plan.columns if c.stream and c.concurrency == 1 and c.model != BATCH_MODEL}
    # The gateway's CPU goals are per 64-token answer, at any concurrency.
    cpu_goals = {
        c.label: "<= 1 ms per 64-token stream" if c.stream else "<= 0.5 ms per non-stream request"
        for c in plan.columns
        if (c.tokens or plan.tokens) == 64
    }
    # At c=1 "N keys" is one key too (worker 0 uses key 0 % 1): the ratio there is the run's own noise.
    one_worker = {c.label for c in plan.columns if c.concurrency == 1}
    for label, tallies in results.items():
        off, one, many = (tallies[s].stats for s in SERIES)
        ratio = "-"
        if one.latency_p50_ms and many.latency_p50_ms:
            ratio = f"{one.latency_p50_ms / many.latency_p50_ms:.2f}x"
        rps = on_off(tallies[SERIES[1]], tallies[SERIES[0]])
        pg = tallies[PG_SERIES].stats
        pg_rps = f"{pg.requests_per_s / off.requests_per_s:.2f}x" if off.requests_per_s else "-"
        bound = "c=1: one key both, the run's noise" if label in one_worker else "<= 1.20x"
        rps_goal = ">= 0.90x"
        if label in one_worker and one.latency_p50_ms is not None and off.latency_p50_ms is not None:
            # One request at a time: requests/s is one over the latency, and what metering adds is latency.
            rps_goal = f"c=1: 1 / latency, metering adding {one.latency_p50_ms - off.latency_p50_ms:+.2f} ms p50"
        line = (
            f"  {label:<28} p50 1 key / N keys {ratio} ({bound}); req/s on / off {rps} ({rps_goal};"
            f" Postgres settlement {pg_rps})"
        )
        table.add(line)
        if label in cpu_goals:
            per_req = [
                f"{name} {ms_req:.3f}"
                for name, series in (("on", SERIES[1]), ("off", SERIES[0]))
                if (ms_req := tallies[series].gateway_ms_per_request) is not None
            ]
            table.add(f"  {'':<28} gateway CPU ms/req: {', '.join(per_req)} ({cpu_goals[label]}, metering on)")
        if label in c1_labels:
            for base in (DIRECT_HTTP, DIRECT):
                if base not in tallies:
                    continue
                b = tallies[base].stats
                added = []
                for series, st in (("on", one), ("off", off), ("on, Postgres settle", pg)):
                    if b.ttft_p50_ms is not None and st.ttft_p50_ms is not None and st.ttft_p99_ms is not None:
                        a50, a99 = st.ttft_p50_ms - b.ttft_p50_ms, st.ttft_p99_ms - (b.ttft_p99_ms or 0.0)
                        added.append(f"{series} {a50:+.2f}/{a99:+.2f}")
                goal = " (<= 1/3 ms, metering on)" if base == DIRECT_HTTP else ""
                table.add(f"  {'':<28} added TTFT p50/p99 ms over {base}: {'; '.join(added)}{goal}")
    if one_worker:
        table.add(
            "  (req/s on / off is a throughput goal, at c > 1. At c=1 it is one over the latency, and metering",
            "  adds its settlement's JetStream acknowledgement to each request: the response ends once the stream",
            "  stored its usage (issue 14: a replica that crashes loses nothing), one round trip in the figure above.)",
        )
    timelines = [(label, series, t.timeline) for label, ts in results.items() for series, t in ts.items() if t.timeline]
    if timelines:
        table.add(
            "",
            "where the time to first token went at c=1, p50 ms of each part (from the gateway's summary lines;"
            " the parts' p50s",
            "need not add up to the whole's): dispatch = the request's arrival at the gateway's handler to its"
            " work message",
            "(auth, body, quota); accept = to a provider's acceptance (NATS both ways, the daemon's admission);"
            " first token =",
            "to the gateway taking the first token; HTTP = what the client waited beyond that (its request's way in,"
            " the first chunk's out)",
        )
        for label, series, parts in timelines:
            cells = "  ".join(f"{part} {value:.3f}" for part, value in parts.items())
            table.add(f"  {label + ' / ' + series:<38} {cells}")
    grants = [
        (label, series, tally)
        for label, tallies in results.items()
        for series, tally in tallies.items()
        if tally.grants is not None and tally.stats.requests
    ]
    if grants:
        table.add(
            "",
            "quota lease statements per 1,000 requests, each series' metering-on gateway (mp_quota_lease_grants_total,",
            "by what the lease ran short of; a lease covers about 2 s of its subject's rate: a few per 1,000 on one",
            "busy key):",
        )
        for label, series, tally in grants:
            assert tally.grants is not None
            per = 1000 / tally.stats.requests
            by_short = ", ".join(f"{k} {v * per:.1f}" for k, v in tally.grants.items())
            table.add(f"  {label + ' / ' + series:<38} {sum(tally.grants.values()) * per:6.1f}  ({by_short})")
    if slow is not None:
        st = Stats.of(slow.level)
        mb = 1 << 20
        grown = max(0, slow.rss_peak - slow.rss_before)
        cpu = "-" if slow.cpu_s is None else f"{1000 * slow.cpu_s / max(1, st.requests):.2f} ms"
        table.add(
            "",
            f"{st.requests} slow streams held open together on the metering-on gateway (one key; opened"
            f" {SLOW_RAMP_PER_S}/s, a token every {SLOW_TOKEN_DELAY_S:g} s, long enough that all are open at the end"
            " of the ramp):",
            f"  at most {slow.peak_open} open at once; ok {st.requests - st.failed}, failed {st.failed}"
            f" ({counts(st.errors)}); TTFT p50 {ms(st.ttft_p50_ms)} ms, p99 {ms(st.ttft_p99_ms)} ms",
            f"  gateway RSS before {slow.rss_before / mb:.0f} MB, peak {slow.rss_peak / mb:.0f} MB"
            f" ({grown / max(1, slow.peak_open) / 1024:.0f} KB per open stream), after {slow.rss_after / mb:.0f} MB;"
            f" gateway CPU per stream {cpu}",
        )
    if profile:
        label = plan.columns[min(plan.profile_column, len(plan.columns) - 1)].label
        table.add("", f"py-spy, the metering-on gateway during its one-key rounds of {label}:", *profile)
    return table.text(
        [
            "gw CPU/req: user+system CPU of that gateway process in the series' rounds / its requests (goal: <= 1 ms",
            "per 64-token stream, <= 0.5 ms per non-stream request). frames/req: the Delta frames the gateway received",
            "per request (its summary lines' `frames`; a daemon puts the tokens it has ready together in one, so the",
            "full-speed daemon's 64-token stream comes in 64 at c=64, its whole answer in 1-3); chunks/req: a streamed",
            "answer's content chunks (frames that queued up at the gateway leave as one); gw µs/frame: gw CPU/req /",
            "frames/req for streams, the request's own cost included (a pool's batched decode steps send a frame per",
            "token per stream: this is what each costs the gateway). PG: all PostgreSQL processes; NATS: the",
            "nats-server (metering on: JetStream storing, acknowledging and delivering the usage events; the series",
            "share one server, so a round's figure holds a little of the consumers' lag). Latency: request sent to",
            "the end of the body.",
            *tail,
        ]
    )


def _many(plan: Plan) -> str:
    sizes = sorted({c.requests or plan.requests for c in plan.columns if c.concurrency > 1})
    return " / ".join(str(n) for n in sizes) or "-"


def _verdict(measured: Measured) -> Verdict:
    sides = [t.stats for col in measured[0].values() for t in col.values()]
    if measured[2] is not None:
        sides.append(Stats.of(measured[2].level))
    hollow = any(s.failed == s.requests for s in sides)
    return Verdict(
        failed=any(s.failed for s in sides), hollow="no request succeeded in some series" if hollow else None
    )


def _stack(home: Path, plan: Plan) -> HotStack:
    stack = HotStack(home, gateways=GATEWAYS)
    stack.durable_postgres = plan.durable_postgres
    return stack


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__, "hotpath")
    parser.add_argument("--tokens", type=cli.positive, default=64, help="max_tokens (default 64)")
    parser.add_argument("--concurrency", type=cli.positive, default=64, help="streamed concurrency (default 64)")
    parser.add_argument("--non-stream", type=int, default=16, help="non-stream concurrency (0: no column)")
    parser.add_argument(
        "--requests",
        type=cli.positive,
        default=None,
        help=f"per column and series (default 512; {CONCURRENT_REQUESTS} where c > 1)",
    )
    parser.add_argument("--rounds", type=cli.positive, default=None, help=f"rounds (default {ROUNDS}; 2 with --quick)")
    parser.add_argument(
        "--slow-streams",
        type=int,
        default=None,
        metavar="N",
        help="slow streams held open at once on one gateway (default 2000; 500 with --quick; 0: none)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the metering-on gateway (pip install py-spy)")
    parser.add_argument(
        "--durable-postgres",
        action="store_true",
        help="PostgreSQL flushes its WAL at every commit, as in production (default: fsync off, as the tests)",
    )
    parser.add_argument(
        "--profile-column",
        type=int,
        default=None,
        metavar="N",
        help="the column --profile samples, counted from 0 (default: streamed at --concurrency)",
    )
    parser.add_argument(
        "--httpx",
        action="store_true",
        help="the load's client is httpx, as a buyer's SDK (default: the lean client, which takes far less CPU)",
    )
    cli.add_run_flags(parser, quick="smoke run: fewer requests")
    args = parser.parse_args(argv)
    # At full speed the answer's other 63 tokens follow its first within about 1.5 ms and contend with the
    # first one's way out for this machine's 2 cores; a 1-token answer shows the gateway's hops alone.
    columns = [Column(True, 1), Column(True, 1, tokens=1)]
    if not args.quick:
        paced = PACED_REQUESTS if args.requests is None else min(args.requests, PACED_REQUESTS)
        columns.append(Column(True, 1, PACED_MODEL, tokens=PACED_TOKENS, requests=paced))
    # Longer series where many requests run at once (not with --quick, nor where --requests says).
    many = CONCURRENT_REQUESTS if args.requests is None and not args.quick else None
    columns.append(Column(True, args.concurrency, requests=many))
    if args.non_stream:
        columns.append(Column(False, args.non_stream, requests=many))
    columns.append(Column(True, args.concurrency, BATCH_MODEL, requests=many))
    if args.non_stream:
        columns.append(Column(False, args.non_stream, BATCH_MODEL, requests=many))
    plan = Plan(
        columns=tuple(columns),
        tokens=args.tokens,
        requests=args.requests or (128 if args.quick else 512),
        rounds=args.rounds or (2 if args.quick else ROUNDS),
        profile_s=1.0 if args.profile else 0.0,
        profile_column=columns.index(Column(True, args.concurrency, requests=many))
        if args.profile_column is None
        else args.profile_column,
        durable_postgres=args.durable_postgres,
        httpx_client=args.httpx,
        slow_streams=args.slow_streams if args.slow_streams is not None else (500 if args.quick else 2000),
    )
    profile_dir = Path(tempfile.mkdtemp(prefix="mp-bench-profile-"))
    try:
        return harness.run(
            prefix="mp-bench-",
            stack=lambda home: _stack(home, plan),
            measure=lambda stack: measure(plan, stack, profile_dir),
            verdict=_verdict,
            table=lambda measured, tail: render(plan, measured, tail),
            keep_logs=args.keep,
            strict=args.strict,
            load_line=True,
            fast_loop=not plan.httpx_client,
        )
    finally:
        if args.keep and args.profile:
            print(f"[bench] py-spy's collapsed stacks kept in {profile_dir}", file=sys.stderr)
        else:
            shutil.rmtree(profile_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
