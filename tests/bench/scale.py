"""`python3 -m tests.bench scale` (`just bench scale`): the local cluster under load, faults and a soak.

Starts `just cluster`'s processes (infra/cluster: 3 NATS nodes with routes and the auth callout,
PostgreSQL, 3 gateway replicas behind Caddy, the other services once each, 3 daemons on the
SYNTHETIC engine: NOT a model, so the numbers are the control plane's) and LiteLLM's proxy in front
of daemon 0's own OpenAI API, then prints one report of four tables:

  load     highest sustained requests/s (streamed and not) through the balancer with 3, 2 and 1
           replicas (auth, quotas and metering on), beside the same requests straight to a daemon's
           own API ("direct": the engine with no control plane) and through LiteLLM to that API;
           latency p50/p99 and the overhead over direct.
  streams  concurrent streams held: N streams at a model's pace (MP_SYNTHETIC_TOKEN_DELAY_S) at once.
  faults   each under load: kill -9 a replica, kill -9 a NATS node, kill -9 and SIGSTOP a daemon,
           restart PostgreSQL, a rolling restart; failures, hangs, silently cut streams, and the
           ledger against what the clients saw (tests/bench/faults.py).
  soak     steady load for --soak seconds: every process's memory at start and end, NATS slow
           consumers, PostgreSQL connections.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from infra.cluster.launch import SYNTHETIC, Cluster, ClusterConfig
from tests.bench import cli, harness
from tests.bench.cpu import CpuProbe
from tests.bench.faults import CLIENT_TIMEOUT_S, FAULTS, Fault, FaultResult, audit, run_fault
from tests.bench.harness import Verdict
from tests.bench.litellm_proxy import LiteLLMProxy
from tests.bench.load import HttpClients, ViaGateway, drive_for, drive_while
from tests.bench.progress import say
from tests.bench.report import Stats
from tests.bench.scale_report import Cell, LoadColumn, SoakResult, StreamLevel, render
from tests.bench.stack import RAISED_QUOTAS
from tests.support.accounts import make_account_async

MODEL = SYNTHETIC
_levels = cli.positive_list(at_least=1, too_few="at least one concurrency level")


@dataclass(frozen=True)
class Plan:
    tokens: int
    levels: tuple[int, ...]
    seconds: float
    stream_levels: tuple[int, ...]
    stream_pace_s: float
    stream_tokens: int
    stream_seconds: float
    fault_pace_s: float
    fault_tokens: int
    fault_streams: int
    fault_whole: int
    faults: tuple[str, ...]
    soak_s: float
    litellm: bool


@dataclass
class Results:
    load: list[LoadColumn] = field(default_factory=list)
    streams: list[StreamLevel] = field(default_factory=list)
    faults: list[FaultResult] = field(default_factory=list)
    soak: SoakResult | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__, "scale")
    parser.add_argument("--tokens", type=cli.positive, default=32, help="max_tokens of the load requests (32)")
    parser.add_argument("--concurrency", type=_levels, default=None, help="load concurrency levels (8,32)")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per load cell (8)")
    parser.add_argument(
        "--streams", type=_levels, default=None, help="concurrent stream levels (96,384,576,768; the pool holds 768)"
    )
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"which faults, in order ({','.join(FAULTS)})")
    parser.add_argument("--soak", type=float, default=None, help="soak seconds (default 120; 0: none)")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM's column out")
    parser.add_argument(
        "--only", choices=("load", "streams", "faults", "soak"), action="append", help="run only these parts"
    )
    cli.add_run_flags(parser, quick="smoke run: short cells, fewer streams, one fault, a 20 s soak")
    return parser


def make_plan(argv: list[str]) -> tuple[Plan, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    quick = args.quick
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"--faults: unknown {unknown}; choose from {', '.join(FAULTS)}")
    only = set(args.only or ("load", "streams", "faults", "soak"))
    soak = args.soak if args.soak is not None else (20.0 if quick else 120.0)
    plan = Plan(
        tokens=args.tokens,
        levels=args.concurrency or ((8,) if quick else (8, 32)),
        seconds=args.seconds or (3.0 if quick else 8.0),
        stream_levels=(args.streams or ((64,) if quick else (96, 384, 576, 768))) if "streams" in only else (),
        stream_pace_s=0.2,
        stream_tokens=20,
        stream_seconds=8.0 if quick else 12.0,
        fault_pace_s=0.02,
        fault_tokens=50,
        fault_streams=12,
        fault_whole=4,
        faults=((faults[:1] if quick else faults) if "faults" in only else ()),
        soak_s=soak if "soak" in only else 0.0,
        litellm=not args.no_litellm and "load" in only,
    )
    if "load" not in only:
        plan = Plan(**{**plan.__dict__, "levels": ()})
    return plan, args


class ScaleStack:
    """The cluster, and LiteLLM's proxy in front of daemon 0's own API."""

    def __init__(self, home: Path, plan: Plan) -> None:
        self.home = home
        self.plan = plan
        self.cluster = Cluster(
            home,
            ClusterConfig(fast_postgres=True, gateway_env=RAISED_QUOTAS),
            say=say,
        )
        self.litellm: LiteLLMProxy | None = None

    def start(self) -> None:
        self.cluster.start()
        if self.plan.litellm:
            upstream = f"{self.cluster.daemons[0].child.api_url}/v1"
            self.litellm = LiteLLMProxy.start(self.home, model=MODEL, upstream=upstream)
            say(f"LiteLLM proxy on {self.litellm.url} -> {upstream}")

    def stop(self) -> None:
        if self.litellm is not None:
            self.litellm.stop()
            self.litellm = None
        self.cluster.stop()


# ---- load -----------------------------------------------------------------------------------


async def _cell(url: str, key: str, plan: Plan, *, stream: bool, concurrency: int, cpu: list[CpuProbe]) -> Cell:
    async with HttpClients(concurrency, 8) as clients:
        one = ViaGateway(clients, url, key, MODEL, plan.tokens, stream=stream)
        await drive_for(one, concurrency=concurrency, seconds=min(2.0, plan.seconds))
        before = [p.snapshot() for p in cpu]
        level = await drive_for(one, concurrency=concurrency, seconds=plan.seconds)
        used = [CpuProbe.used(b, p.snapshot()) for p, b in zip(cpu, before, strict=True)]
    return Cell(Stats.of(level), None if any(u is None for u in used) else sum(u or 0.0 for u in used))


async def _column(label: str, url: str, key: str, plan: Plan, cpu: list[CpuProbe]) -> LoadColumn:
    """`cpu`: the processes whose CPU a request costs on this path (the proxy's own, not the upstream's)."""
    column = LoadColumn(label)
    for stream in (True, False):
        for c in plan.levels:
            cell = await _cell(url, key, plan, stream=stream, concurrency=c, cpu=cpu)
            column.cells[(stream, c)] = cell.stats
            column.cpu_s[(stream, c)] = cell.cpu_s
            kind = "stream" if stream else "whole "
            say(f"  {label:<28} {kind} c={c:<3} {cell.stats.requests_per_s:7.1f} req/s, {cell.stats.failed} failed")
    return column


def _gateways(cluster: Cluster) -> list[CpuProbe]:
    return [CpuProbe(g.child.proc.pid) for g in cluster.gateways if g.child.alive()]


async def measure_load(stack: ScaleStack, plan: Plan) -> list[LoadColumn]:
    cluster = stack.cluster
    say("load: daemons at full speed (MP_SYNTHETIC_TOKEN_DELAY_S=0)")
    daemon = cluster.daemons[0].child
    columns = [await _column("direct (a daemon's API)", daemon.api_url, "none", plan, [CpuProbe(daemon.proc.pid)])]
    if stack.litellm is not None:
        litellm = [CpuProbe(stack.litellm.child.proc.pid, tree=True)]
        columns.append(await _column("LiteLLM proxy", stack.litellm.url, stack.litellm.key, plan, litellm))
    replicas = len(cluster.gateways)
    label = f"mac-provider, {replicas} replicas"
    columns.append(await _column(label, cluster.url, cluster.api_key, plan, _gateways(cluster)))
    # Scale down gracefully (SIGTERM: the balancer takes each out), measure, then bring them back.
    for n in range(replicas - 1, 0, -1):
        await asyncio.to_thread(cluster.drain_gateway, n)
        await asyncio.sleep(1.0)
        label = f"mac-provider, {n} replica" + ("s" if n > 1 else "")
        columns.append(await _column(label, cluster.url, cluster.api_key, plan, _gateways(cluster)))
    for n in range(1, replicas):
        await asyncio.to_thread(cluster.start_gateway_again, n)
    return columns


# ---- concurrent streams ---------------------------------------------------------------------


async def measure_streams(stack: ScaleStack, plan: Plan) -> list[StreamLevel]:
    cluster = stack.cluster
    say(f"streams: daemons at {1 / plan.stream_pace_s:g} tokens/s per stream")
    await asyncio.to_thread(cluster.restart_daemons, {"MP_SYNTHETIC_TOKEN_DELAY_S": str(plan.stream_pace_s)})
    out = []
    for n in plan.stream_levels:
        async with HttpClients(n, 8, timeout_s=60.0) as clients:
            one = ViaGateway(clients, cluster.url, cluster.api_key, MODEL, plan.stream_tokens)
            level = await drive_for(one, concurrency=n, seconds=plan.stream_seconds)
        stats = Stats.of(level)
        out.append(StreamLevel(n, stats, 1 / plan.stream_pace_s))
        say(f"  {n} streams: {stats.requests} finished, {stats.failed} failed")
    return out


# ---- faults ---------------------------------------------------------------------------------


async def _fault_pace(cluster: Cluster, plan: Plan) -> None:
    if cluster.daemon_env.get("MP_SYNTHETIC_TOKEN_DELAY_S") != str(plan.fault_pace_s):
        await asyncio.to_thread(cluster.restart_daemons, {"MP_SYNTHETIC_TOKEN_DELAY_S": str(plan.fault_pace_s)})


def _healthy(cluster: Cluster) -> None:
    """Between faults: every replica ready and every daemon in every pool, before the next one."""
    deadline = time.monotonic() + 60
    while not all(cluster.ready(g) for g in cluster.gateways):
        if time.monotonic() > deadline:
            raise TimeoutError("a replica stayed unready after its fault")
        time.sleep(0.2)
    cluster.wait_served()


async def measure_faults(stack: ScaleStack, plan: Plan) -> list[FaultResult]:
    cluster = stack.cluster
    say(f"faults: daemons at {1 / plan.fault_pace_s:g} tokens/s per stream, {plan.fault_tokens} tokens a request")
    await _fault_pace(cluster, plan)
    results = []
    for name in plan.faults:
        fault: Fault = FAULTS[name]
        await asyncio.to_thread(_healthy, cluster)
        result = await run_fault(
            cluster,
            fault,
            base_url=cluster.url,
            model=MODEL,
            tokens=plan.fault_tokens,
            streams=plan.fault_streams,
            whole=plan.fault_whole,
            before_s=3.0,
            after_s=5.0,
            settle_s=60.0,
        )
        say(
            f"  {fault.label}: {len(result.samples)} requests, {result.failed} failed, {result.hung} hung,"
            f" ledger: {result.audit.rows} rows, {result.audit.lost} lost"
        )
        results.append(result)
    return results


# ---- soak -----------------------------------------------------------------------------------


async def _pg_connections(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        # Every client backend but this one: the services' pools and the callout's listeners.
        n = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        return int(n)
    finally:
        await conn.close()


async def measure_soak(stack: ScaleStack, plan: Plan) -> SoakResult:
    cluster = stack.cluster
    assert cluster.nats is not None
    await _fault_pace(cluster, plan)
    await asyncio.to_thread(_healthy, cluster)
    say(f"soak: {plan.soak_s:g}s of steady load")
    account = await make_account_async(cluster.database_url)
    until = time.perf_counter() + plan.soak_s
    warm_s = min(10.0, plan.soak_s / 4)
    result = SoakResult(seconds=plan.soak_s)
    async with HttpClients(plan.fault_streams + plan.fault_whole, 8, timeout_s=CLIENT_TIMEOUT_S) as clients:
        stream = ViaGateway(clients, cluster.url, account.key, MODEL, plan.fault_tokens)
        whole = ViaGateway(clients, cluster.url, account.key, MODEL, plan.fault_tokens, stream=False)

        def going() -> bool:
            return time.perf_counter() < until

        loads = [
            asyncio.create_task(drive_while(stream, concurrency=plan.fault_streams, going=going)),
            asyncio.create_task(
                drive_while(whole, concurrency=plan.fault_whole, going=going, workers_from=plan.fault_streams)
            ),
        ]
        await asyncio.sleep(warm_s)
        result.rss_start = cluster.rss_mb()
        result.slow_start = cluster.nats.slow_consumers()
        while time.perf_counter() < until - 1:
            result.pg_connections.append(await _pg_connections(cluster.database_url))
            await asyncio.sleep(min(5.0, max(0.1, until - time.perf_counter() - 1)))
        result.rss_end = cluster.rss_mb()
        result.slow_end = cluster.nats.slow_consumers()
        levels = await asyncio.gather(*loads)
    result.samples = [s for level in levels for s in level.samples]
    result.audit = await audit(cluster.database_url, account, result.samples, settle_s=60.0)
    result.pg_connections.append(await _pg_connections(cluster.database_url))
    say(f"  soak: {len(result.samples)} requests, {sum(not s.ok for s in result.samples)} failed")
    return result


async def measure(stack: ScaleStack, plan: Plan) -> Results:
    results = Results()
    if plan.levels:
        results.load = await measure_load(stack, plan)
    if plan.stream_levels:
        results.streams = await measure_streams(stack, plan)
    if plan.faults:
        results.faults = await measure_faults(stack, plan)
    if plan.soak_s > 0:
        results.soak = await measure_soak(stack, plan)
    return results


def _verdict(results: Results) -> Verdict:
    must_be_zero = sum(
        f.hung
        + f.cut_silently
        + len(f.shut_out)
        + f.audit.lost
        + f.audit.unsettled
        + f.audit.over_billed
        + f.audit.unseen_billed
        for f in results.faults
    )
    load_failed = any(s.failed for column in results.load for s in column.cells.values())
    soak_failed = results.soak is not None and results.soak.failed > 0
    return Verdict(failed=bool(must_be_zero) or load_failed or soak_failed, keep_failed_logs=True)


def main(argv: list[str]) -> int:
    plan, args = make_plan(argv)
    return harness.run(
        prefix="mp-bench-scale-",
        stack=lambda home: ScaleStack(home, plan),
        measure=lambda stack: measure(stack, plan),
        verdict=_verdict,
        table=lambda results, tail: render(plan, results, tail),
        keep_logs=args.keep,
        strict=args.strict,
        load_line=True,
    )
