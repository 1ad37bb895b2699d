"""`python3 -m tests.bench metering` (`just bench metering`): what quotas + metering cost per request.

One nats-server, one PostgreSQL, one synthetic provider daemon, and two control
planes on them that differ only in `MP_METERING` (off / on). The same requests
go to both, in rounds whose order alternates, and one table puts the two side
by side per column (streamed at each concurrency level, plus one non-streamed
column). Everything started is stopped again, also on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from tests.bench import harness
from tests.bench.cpu import CpuProbe
from tests.bench.harness import Verdict
from tests.bench.load import HttpClients, Level, ViaGateway, drive, warmup
from tests.bench.machine import machine_lines
from tests.bench.progress import say
from tests.bench.prompts import MESSAGES
from tests.bench.report import Comparison, Side, Stats, render_metering
from tests.bench.stack import RAISED_QUOTAS, GatewaySpec
from tests.bench.synthetic import MODEL_ID, SyntheticStack

OFF = "metering-off"
ON = "metering-on"
# Both get the raised quotas, so the two processes differ in MP_METERING alone.
GATEWAYS = (
    GatewaySpec(OFF, {**RAISED_QUOTAS, "MP_METERING": "off"}),
    GatewaySpec(ON, {**RAISED_QUOTAS, "MP_METERING": "on"}),
)

DEFAULT_ROUNDS = 4
QUICK_ROUNDS = 2
DEFAULT_NON_STREAM = 16


@dataclass(frozen=True, slots=True)
class Column:
    """One column of the table: a kind of request at one concurrency."""

    stream: bool
    concurrency: int

    @property
    def label(self) -> str:
        return f"{'stream' if self.stream else 'non-stream'}, concurrency {self.concurrency}"


@dataclass(frozen=True)
class MeteringPlan:
    columns: tuple[Column, ...]
    tokens: int
    requests: int | None
    quick: bool
    rounds: int
    streams_per_client: int

    def requests_for(self, concurrency: int) -> int:
        """Measured requests per column and gateway."""
        if self.requests is not None:
            return self.requests
        if self.quick:
            return max(64, 4 * concurrency)
        return max(640, 24 * concurrency)

    def round_sizes(self, concurrency: int) -> list[int]:
        """The column's requests split as evenly as possible into rounds (fewer rounds than requests)."""
        n = self.requests_for(concurrency)
        rounds = min(self.rounds, n)
        return [n // rounds + (1 if i < n % rounds else 0) for i in range(rounds)]


def make_plan(args: argparse.Namespace, levels: tuple[int, ...]) -> MeteringPlan:
    non_stream = DEFAULT_NON_STREAM if args.non_stream is None else args.non_stream
    columns = [Column(True, c) for c in levels]
    if non_stream:
        columns.append(Column(False, non_stream))
    return MeteringPlan(
        columns=tuple(columns),
        tokens=args.tokens,
        requests=args.requests,
        quick=args.quick,
        rounds=args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS),
        streams_per_client=args.streams_per_client,
    )


@dataclass
class _Tally:
    """One gateway's rounds of one column."""

    levels: list[Level]
    gateway_cpu_s: float | None = 0.0
    postgres_cpu_s: float | None = 0.0

    def side(self) -> Side:
        return Side(Stats.of(Level.merge(self.levels)), self.gateway_cpu_s, self.postgres_cpu_s)


def _add(total: float | None, used: float | None) -> float | None:
    return None if total is None or used is None else total + used


def _order(k: int) -> tuple[str, str]:
    return (OFF, ON) if k % 2 == 0 else (ON, OFF)


async def measure(plan: MeteringPlan, stack: SyntheticStack) -> list[Comparison]:
    assert stack.postgres_pid is not None
    postgres = CpuProbe(stack.postgres_pid, tree=True)
    probes = {name: CpuProbe(gw.child.proc.pid, tree=True) for name, gw in stack.gateways.items()}
    top = max(c.concurrency for c in plan.columns)
    results: list[Comparison] = []
    # Each gateway has its own pools, so its warm keep-alive connections stay open while the other one runs.
    async with HttpClients(top, plan.streams_per_client) as off, HttpClients(top, plan.streams_per_client) as on:
        clients = {OFF: off, ON: on}
        for index, column in enumerate(plan.columns):
            c = column.concurrency
            send = {
                name: ViaGateway(clients[name], gw.base_url, stack.api_key, MODEL_ID, plan.tokens, stream=column.stream)
                for name, gw in stack.gateways.items()
            }
            for name in _order(index):
                await drive(send[name], concurrency=c, requests=warmup(c))
            tallies = {OFF: _Tally([]), ON: _Tally([])}
            sizes = plan.round_sizes(c)
            for r, size in enumerate(sizes):
                # Whoever went first last round goes second now: neither side always follows the other.
                for name in _order(index + r):
                    tally = tallies[name]
                    pg0, gw0 = postgres.snapshot(), probes[name].snapshot()
                    tally.levels.append(await drive(send[name], concurrency=c, requests=size))
                    pg1, gw1 = postgres.snapshot(), probes[name].snapshot()
                    tally.postgres_cpu_s = _add(tally.postgres_cpu_s, CpuProbe.used(pg0, pg1))
                    tally.gateway_cpu_s = _add(tally.gateway_cpu_s, CpuProbe.used(gw0, gw1))
                stack.check_alive()
            deltas = [
                on_p50 - off_p50
                for off_level, on_level in zip(tallies[OFF].levels, tallies[ON].levels, strict=True)
                if (off_p50 := Stats.of(off_level).latency_p50_ms) is not None
                and (on_p50 := Stats.of(on_level).latency_p50_ms) is not None
            ]
            comparison = Comparison(column.label, tallies[OFF].side(), tallies[ON].side(), deltas)
            for name, side in (("off", comparison.off), ("on ", comparison.on)):
                s = side.stats
                say(
                    f"{column.label:<26} metering {name}: {s.requests} requests in {len(sizes)} rounds, "
                    f"{s.wall_s:6.2f}s, {s.failed} failed"
                )
            results.append(comparison)
    return results


def header(plan: MeteringPlan) -> list[str]:
    per_column = ", ".join(
        f"{'' if col.stream else 'non-stream '}c={col.concurrency}: {plan.requests_for(col.concurrency)}"
        for col in plan.columns
    )
    rounds = max(len(plan.round_sizes(col.concurrency)) for col in plan.columns)
    n = plan.streams_per_client
    pool = f"{n} streams per client (encode/httpx#3215)" if n else "one client for all streams"
    return [
        "mac-provider metering benchmark: what quotas + metering cost per request "
        f"({time.strftime('%Y-%m-%d %H:%M:%S %Z')})",
        "",
        "ENGINE: the SYNTHETIC stand-in (MP_ENGINE=synthetic). IT IS NOT A MODEL: it emits a fixed text, one token",
        "        per step, as fast as it can. These numbers measure the serving path, not inference speed.",
        "measured: the same gateway with MP_METERING=off and =on. One nats-server, one PostgreSQL, one provider",
        "          daemon, and TWO control-plane processes on them that differ only in MP_METERING.",
        "  metering off = no quota check, no reservation, no usage ledger, no background writes (authentication,",
        "                 dispatch over NATS and the response are the same code as with metering on)",
        "  metering on  = the product's default. Requests are admitted from the replica's quota lease, in memory",
        "                 (services/usage/leases.py: a slice of the account's requests, tokens and slots taken in one",
        "                 statement, sized to its rate); each request's reservation row and its settlement are",
        "                 written by group commit (one statement for every request queued meanwhile), the reservation",
        "                 while the request is dispatched. Per gateway every 2 s: progress of open reservations and",
        "                 lease upkeep; every 7.5 s: stale reservations and leases of dead replicas. One key for all.",
        "  quotas (both): limits raised so that the load is never refused:",
        "                 " + ", ".join(f"{k}={v}" for k, v in RAISED_QUOTAS.items()),
        f"load: POST /v1/chat/completions, max_tokens={plan.tokens}, the same {len(MESSAGES)} messages every time;",
        "      stream=true (with include_usage) except in the non-stream column; closed loop at the column's",
        f"      concurrency. Measured requests per column and gateway: {per_column},",
        f"      in {rounds} rounds: each round runs one gateway, then the other, and who goes first alternates from",
        "      round to round, so drift and noise fall on both alike; after an unmeasured warm-up of each",
        "      (max(4, concurrency) requests). Client: httpx.AsyncClient, HTTP/1.1 keep-alive, its own pools per",
        f"      gateway, {pool}, responses parsed in the benchmark process.",
        *machine_lines("the client, both control planes, nats-server, daemon and PostgreSQL"),
    ]


FOOTER = [
    "latency: from sending the request to the end of the response body. The gateway settles a request before it ends",
    "the body (a streamed one after [DONE]), so latency includes reservation and settlement; TTFT (to the first",
    "content token; streamed only) includes the reservation. requests/s: successful requests / wall time summed over",
    "the gateway's rounds. CPU per request: CPU time (user + system) of that gateway's process, and of all PostgreSQL",
    "processes, during its rounds / its measured requests (the client, NATS and the daemon are not counted).",
    "p50/p99: nearest rank over the measured requests. 'per round': the p50 difference computed round by round",
    "(each round's requests to one gateway against that round's to the other), to show how far noise moves it.",
    "failed: HTTP error, in-band error, or not exactly max_tokens tokens ending in finish_reason=length.",
]


def _verdict(columns: list[Comparison]) -> Verdict:
    sides = [s for c in columns for s in (c.off.stats, c.on.stats)]
    # A column where nothing succeeded measured nothing: keep the logs that say why.
    hollow = any(s.failed == s.requests for s in sides)
    return Verdict(
        failed=any(s.failed for s in sides), hollow="no request succeeded in some column" if hollow else None
    )


def run(plan: MeteringPlan, *, keep_logs: bool, strict: bool) -> int:
    return harness.run(
        prefix="mp-bench-",
        stack=lambda home: SyntheticStack(home, gateways=GATEWAYS),
        measure=lambda stack: measure(plan, stack),
        verdict=_verdict,
        table=lambda columns, tail: render_metering(header=header(plan), columns=columns, footer=[*FOOTER, *tail]),
        keep_logs=keep_logs,
        strict=strict,
    )
