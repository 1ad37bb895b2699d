"""The scale benchmark's report: load, concurrent streams, faults and soak, each a table in the one style
(tests/bench/table.py), under one caption that says what ran on which machine."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tests.bench.faults import CLIENT_TIMEOUT_S, Audit, FaultResult
from tests.bench.load import Sample
from tests.bench.machine import machine_lines
from tests.bench.report import Stats
from tests.bench.table import Table, ms, rate

if TYPE_CHECKING:
    from tests.bench.scale import Plan, Results


@dataclass(frozen=True)
class Cell:
    stats: Stats
    # CPU seconds the path's own serving processes used meanwhile (None: unreadable).
    cpu_s: float | None


@dataclass
class LoadColumn:
    label: str
    # (streamed, concurrency) -> the measured cell, and the CPU it cost the path's serving processes.
    cells: dict[tuple[bool, int], Stats] = field(default_factory=dict)
    cpu_s: dict[tuple[bool, int], float | None] = field(default_factory=dict)

    def cpu_ms(self, key: tuple[bool, int]) -> float | None:
        """CPU milliseconds per request of the path's serving processes."""
        cpu, stats = self.cpu_s.get(key), self.cells.get(key)
        if cpu is None or stats is None or stats.requests == 0:
            return None
        return 1000 * cpu / stats.requests

    def best_rps(self, stream: bool) -> float | None:
        values = [s.requests_per_s for (st, _), s in self.cells.items() if st == stream and s.failed == 0]
        return max(values) if values else None


@dataclass(frozen=True)
class StreamLevel:
    streams: int
    stats: Stats
    nominal_tps: float

    @property
    def held(self) -> bool:
        s = self.stats
        return (
            s.failed == 0
            and s.decode_tps_p50 is not None
            and s.decode_tps_p50 >= 0.8 * self.nominal_tps
            and s.ttft_p99_ms is not None
            and s.ttft_p99_ms < 2000
        )


@dataclass
class SoakResult:
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    rss_start: dict[str, float] = field(default_factory=dict)
    rss_end: dict[str, float] = field(default_factory=dict)
    slow_start: dict[str, int] = field(default_factory=dict)
    slow_end: dict[str, int] = field(default_factory=dict)
    pg_connections: list[int] = field(default_factory=list)
    audit: Audit = field(default_factory=Audit)

    @property
    def failed(self) -> int:
        return sum(1 for s in self.samples if not s.ok)


def _caption(plan: Plan) -> list[str]:
    return [
        f"mac-provider scale benchmark: the local cluster (`just cluster`) ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})",
        "",
        "ENGINE: the SYNTHETIC stand-in (MP_ENGINE=synthetic) in every daemon. IT IS NOT A MODEL: a fixed text,",
        "        one token per step (as fast as it can, or at MP_SYNTHETIC_TOKEN_DELAY_S). Control-plane load only.",
        "cluster: 3 NATS nodes (routes, auth callout), PostgreSQL, 3 gateway replicas behind Caddy (active health",
        "         checks on /healthz/ready every 250 ms, least_conn), status/auth/keys/usage/providers once each,",
        "         2 natsauth, 3 daemons; auth (mp_ key), quotas and metering ON (the benchmark accounts' limits",
        "         raised so that their own load is never refused).",
        *machine_lines("the client, Caddy, 3 nats-servers, 10 control-plane processes, 3 daemons, LiteLLM, PostgreSQL"),
        "         THIS MACHINE HAS 2 CORES: the whole cluster and its load generator compete for them, so",
        "         adding replicas adds processes, not cores.",
    ]


def _overhead(via: Stats | None, direct: Stats | None, pick: Callable[[Stats], float | None]) -> str:
    if via is None or direct is None:
        return "-"
    a, b = pick(via), pick(direct)
    return "-" if a is None or b is None else f"{a - b:+.2f}"


def _P50(s: Stats) -> float | None:
    return s.latency_p50_ms


def _P99(s: Stats) -> float | None:
    return s.latency_p99_ms


def render_load(plan: Plan, columns: list[LoadColumn]) -> list[str]:
    table = Table(
        [
            "LOAD: closed loop through each path; every cell measured for "
            f"{plan.seconds:g} s after a warm-up, max_tokens={plan.tokens}.",
            "  direct   = the same HTTP request to daemon 0's own OpenAI API (the engine, no control plane)",
            "  LiteLLM  = LiteLLM's proxy (1 worker, master key, no database: no per-key budgets or spend",
            "             tracking) in front of that same daemon API",
            "  replicas = through Caddy to the gateway replicas, NATS and all 3 daemons; 2 and 1 replicas: the",
            "             others stopped by SIGTERM (the balancer took them out)",
            "  serving CPU = CPU time of the path's own serving processes over its requests: the daemon (direct),",
            "             LiteLLM's processes, the gateway replicas (not Caddy, NATS, daemons, Postgres); its inverse",
            "             is what one core would serve: the figure that scales with cores, which this machine lacks",
        ],
        label=34,
        cell=24,
        columns=len(columns),
    )
    table.row("", [c.label for c in columns])
    table.rule()
    direct = columns[0]
    for stream in (True, False):
        kind = "streamed" if stream else "not streamed"
        for c in plan.levels:
            cells = [col.cells.get((stream, c)) for col in columns]
            base = direct.cells.get((stream, c))
            table.add(f"{kind}, concurrency {c}")
            table.row("  requests/s", [rate(s.requests_per_s) if s else "-" for s in cells])
            table.row(
                "  latency p50 / p99 (ms)",
                [f"{ms(s.latency_p50_ms)} / {ms(s.latency_p99_ms)}" if s else "-" for s in cells],
            )
            table.row(
                "  overhead over direct p50 / p99",
                [f"{_overhead(s, base, _P50)} / {_overhead(s, base, _P99)}" for s in cells],
            )
            if stream:
                table.row(
                    "  TTFT p50 / p99 (ms)", [f"{ms(s.ttft_p50_ms)} / {ms(s.ttft_p99_ms)}" if s else "-" for s in cells]
                )
            cpu = [col.cpu_ms((stream, c)) for col in columns]
            table.row("  serving CPU per request (ms)", [ms(v) for v in cpu])
            table.row("  = requests/s per core", [rate(1000 / v) if v else "-" for v in cpu])
            table.row("  failed / requests", [f"{s.failed} / {s.requests}" if s else "-" for s in cells])
    table.rule()
    table.row("highest requests/s, streamed", [rate(c.best_rps(True)) for c in columns])
    table.row("highest requests/s, not streamed", [rate(c.best_rps(False)) for c in columns])
    table.rule()
    table.failures(
        "failed requests (by error):",
        [
            (f"{col.label} {'stream' if st else 'whole'} c={c}", s.errors)
            for col in columns
            for (st, c), s in col.cells.items()
        ],
    )
    return table.text([]).splitlines()


def render_streams(levels: list[StreamLevel], plan: Plan) -> list[str]:
    table = Table(
        [
            f"CONCURRENT STREAMS through the balancer: N streams at once (closed loop, {plan.stream_seconds:g} s),",
            f"each {plan.stream_tokens} tokens at {1 / plan.stream_pace_s:g} tokens/s (a model's pace:"
            f" MP_SYNTHETIC_TOKEN_DELAY_S={plan.stream_pace_s:g}).",
            "held = no failure, per-stream decode rate p50 >= 80% of the pace, TTFT p99 < 2 s. The pool holds 768",
            "(3 daemons x 256 synthetic slots): at that level each replica, seeing free slots, sends requests a",
            "daemon turns away as busy, and those end 503 (no provider) after the tries.",
        ],
        label=34,
        cell=14,
        columns=len(levels),
    )
    table.row("", [f"{lv.streams} streams" for lv in levels])
    table.rule()
    rows: list[tuple[str, Callable[[StreamLevel], str]]] = [
        ("streams finished", lambda lv: str(lv.stats.requests)),
        ("failed", lambda lv: str(lv.stats.failed)),
        ("TTFT p50 (ms)", lambda lv: ms(lv.stats.ttft_p50_ms)),
        ("TTFT p99 (ms)", lambda lv: ms(lv.stats.ttft_p99_ms)),
        ("decode tok/s per stream, p50", lambda lv: rate(lv.stats.decode_tps_p50)),
        ("tokens/s, all streams", lambda lv: rate(lv.stats.throughput_tps)),
        ("held", lambda lv: "yes" if lv.held else "NO"),
    ]
    for label, cell in rows:
        table.row(label, [cell(lv) for lv in levels])
    table.rule()
    table.failures("failed streams (by error):", [(f"{lv.streams} streams", lv.stats.errors) for lv in levels])
    return table.text([]).splitlines()


def render_faults(results: list[FaultResult], plan: Plan) -> list[str]:
    table = Table(
        [
            f"FAULTS, each under load: {plan.fault_streams} streamed + {plan.fault_whole} non-streamed requests in"
            f" flight (closed loop), {plan.fault_tokens} tokens each at",
            f"{1 / plan.fault_pace_s:g} tokens/s; the fault 3 s in, repaired, 5 s more; a fresh account per fault."
            f" Client read timeout {CLIENT_TIMEOUT_S:g} s.",
            "Targets: gateway-0, nats-0 (also natsauth-0's node), daemon 0 (killed), daemon 1 (SIGSTOP 6 s).",
        ],
        label=44,
        cell=19,
        columns=len(results),
    )
    table.row("", [r.label for r in results])
    table.rule()
    rows: list[tuple[str, Callable[[FaultResult], str]]] = [
        ("requests", lambda r: str(len(r.samples))),
        ("failed", lambda r: str(r.failed)),
        ("hung past the client timeout (must be 0)", lambda r: str(r.hung)),
        ("streams cut silently (must be 0)", lambda r: str(r.cut_silently)),
        ("streams cut with an in-band error", lambda r: str(r.cut_in_band)),
        ("streams cut by the connection (replica died)", lambda r: str(r.cut_transport)),
        ("ledger rows", lambda r: str(r.audit.rows)),
        ("usage rows lost (must be 0)", lambda r: str(r.audit.lost + r.audit.unsettled)),
        ("rows billing > delivered (must be 0)", lambda r: str(r.audit.over_billed)),
        ("billed rows no client saw (must be 0)", lambda r: str(r.audit.unseen_billed)),
        ("rows billing < delivered (tokens)", lambda r: f"{r.audit.under_billed} ({r.audit.under_billed_tokens})"),
        ("violations charged to daemons (must be 0)", lambda r: str(sum(r.violations.values()))),
        ("providers suspended/banned (must be 0)", lambda r: str(len(r.shut_out))),
        ("time to recover (s)", lambda r: f"{r.recovered_s:.2f}"),
        ("fault -> repaired (s)", lambda r: f"{r.repair_s:.1f}"),
        ("slowest request (s)", lambda r: f"{r.slowest_s:.1f}"),
    ]
    for label, cell in rows:
        table.row(label, [cell(r) for r in results])
    table.rule()
    table.failures("failed requests (by error):", [(r.label, r.errors) for r in results])
    outcomes = [(r.label, Counter(r.audit.outcomes)) for r in results]
    table.failures("ledger outcomes:", outcomes)
    table.failures(
        "providers shut out by the pool (pinned again before the next fault):",
        [(r.label, Counter(r.shut_out)) for r in results],
    )
    table.add(
        "time to recover: from the fault to the end of the last failed request (0: none failed). fault -> repaired:",
        "the fault's own length (restart, SIGCONT, ...). lost: a 200 answer with no ledger row, or a reservation",
        "never settled. billing < delivered: a killed replica's requests are settled from the progress it last",
        "reported (every 2 s) by another replica.",
    )
    return table.text([]).splitlines()


def render_soak(soak: SoakResult) -> list[str]:
    names = sorted(set(soak.rss_start) | set(soak.rss_end))
    table = Table(
        [
            f"SOAK: {soak.seconds:g} s of the faults' steady load; memory sampled after a warm-up and at the end.",
            f"requests: {len(soak.samples)}, failed: {soak.failed}; ledger: {soak.audit.rows} rows,"
            f" lost {soak.audit.lost + soak.audit.unsettled}, billing > delivered {soak.audit.over_billed},"
            f" unseen billed {soak.audit.unseen_billed}",
            f"NATS slow consumers (each node's /varz): start {sum(soak.slow_start.values())},"
            f" end {sum(soak.slow_end.values())} ({', '.join(f'{k}={v}' for k, v in soak.slow_end.items())})",
            f"PostgreSQL client connections (pg_stat_activity, every 5 s): min {min(soak.pg_connections, default=0)},"
            f" max {max(soak.pg_connections, default=0)} (bounded by each process's pool, MP_DB_POOL_SIZE=6, 4 for"
            " natsauth, plus its LISTEN connections)",
        ],
        label=34,
        cell=12,
        columns=3,
    )
    table.row("memory (MB; postgres: USS)", ["start", "end", "change"])
    table.rule()
    for name in names:
        a, b = soak.rss_start.get(name), soak.rss_end.get(name)
        change = f"{b - a:+.1f}" if a is not None and b is not None else "-"
        table.row(name, [f"{a:.1f}" if a else "-", f"{b:.1f}" if b else "-", change])
    table.rule()
    return table.text([]).splitlines()


def render(plan: Plan, results: Results, tail: list[str]) -> str:
    lines = _caption(plan)
    if results.load:
        lines += ["", *render_load(plan, results.load)]
    if results.streams:
        lines += ["", *render_streams(results.streams, plan)]
    if results.faults:
        lines += ["", *render_faults(results.faults, plan)]
    if results.soak is not None:
        lines += ["", *render_soak(results.soak)]
    return "\n".join([*lines, "", *tail])
