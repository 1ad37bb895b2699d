"""Statistics per (path, concurrency) and the side-by-side plain-text tables of every mode."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tests.bench.load import Level
from tests.bench.table import PairTable, Table, counts, ms, rate


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: always one of the observed values (p99 of 16 samples is the max)."""
    if not values:
        return None
    return float(np.percentile(values, q, method="inverted_cdf"))


@dataclass(frozen=True, slots=True)
class Stats:
    concurrency: int
    requests: int
    failed: int
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    # The whole request, of the successful ones.
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    decode_tps_p50: float | None
    throughput_tps: float
    requests_per_s: float
    wall_s: float
    cpu_s: float
    errors: Counter[str]

    @classmethod
    def of(cls, level: Level) -> Stats:
        ok = [s for s in level.samples if s.ok]
        ttfts = [t * 1000 for s in ok if (t := s.ttft_s) is not None]
        rates = [r for s in ok if (r := s.decode_tps) is not None]
        latencies = [s.latency_s * 1000 for s in ok]
        wall = max(level.wall_s, 1e-9)
        p50, p99 = percentile(ttfts, 50), percentile(ttfts, 99)
        return cls(
            concurrency=level.concurrency,
            requests=len(level.samples),
            failed=len(level.samples) - len(ok),
            ttft_p50_ms=p50,
            ttft_p99_ms=p99,
            latency_p50_ms=percentile(latencies, 50),
            latency_p99_ms=percentile(latencies, 99),
            decode_tps_p50=percentile(rates, 50),
            # Only tokens of requests that completed correctly count.
            throughput_tps=sum(s.tokens for s in ok) / wall,
            requests_per_s=len(ok) / wall,
            wall_s=level.wall_s,
            cpu_s=level.cpu_s,
            errors=Counter(s.error for s in level.samples if s.error is not None),
        )


def _pct(cpu_s: float, wall_s: float) -> str:
    return f"{100 * cpu_s / wall_s:.0f}" if wall_s > 0 else "-"


def _ratio(num: float, den: float) -> str:
    if den <= 0:
        return "-"
    r = num / den
    if r <= 0:
        return "0×"
    return f"{r:.3f}× (1/{1 / r:,.0f})" if r < 1 else f"{r:.2f}×"


def _ttft_delta(via: Stats, direct: Stats) -> str:
    if via.ttft_p50_ms is None or direct.ttft_p50_ms is None:
        return "-"
    return f"{via.ttft_p50_ms - direct.ttft_p50_ms:+.2f} ms"


def render(*, header: list[str], direct: list[Stats], via: list[Stats], footer: list[str]) -> str:
    pairs = list(zip(direct, via, strict=True))
    table = PairTable(header, label=31, half=13, columns=len(pairs))
    table.row("", [f"concurrency {d.concurrency}".center(table.cell) for d in direct])
    table.pairs("", [("direct", "via gateway") for _ in pairs])
    table.rule()
    metrics: list[tuple[str, Callable[[Stats], str]]] = [
        ("requests measured", lambda s: str(s.requests)),
        ("failed", lambda s: str(s.failed)),
        ("TTFT p50 (ms)", lambda s: ms(s.ttft_p50_ms)),
        ("TTFT p99 (ms)", lambda s: ms(s.ttft_p99_ms)),
        ("decode tok/s per request, p50", lambda s: rate(s.decode_tps_p50)),
        ("aggregate throughput (tok/s)", lambda s: rate(s.throughput_tps)),
        ("requests/s", lambda s: rate(s.requests_per_s)),
        ("wall time (ms)", lambda s: ms(s.wall_s * 1000)),
        ("benchmark process CPU (%)", lambda s: _pct(s.cpu_s, s.wall_s)),
    ]
    for label, cell in metrics:
        table.pairs(label, [(cell(d), cell(v)) for d, v in pairs])
    table.rule()
    table.add("gateway overhead")
    table.row("  TTFT p50, via minus direct", [_ttft_delta(v, d) for d, v in pairs])
    table.row("  throughput, via / direct", [_ratio(v.throughput_tps, d.throughput_tps) for d, v in pairs])
    table.rule()
    table.failures(
        "failed requests (by error):",
        [
            (f"{path} @ concurrency {s.concurrency}", s.errors)
            for path, ss in (("direct", direct), ("via gateway", via))
            for s in ss
        ],
    )
    return table.text(footer)


# ---- `metering` mode: the same gateway with MP_METERING=off and =on ----------------------


@dataclass(frozen=True, slots=True)
class Side:
    """One gateway's measured requests of one column, with the server CPU they cost."""

    stats: Stats
    # CPU seconds of that gateway's process, and of PostgreSQL (all its processes), during its rounds.
    gateway_cpu_s: float | None
    postgres_cpu_s: float | None

    def per_request_ms(self, cpu_s: float | None) -> float | None:
        if cpu_s is None or self.stats.requests == 0:
            return None
        return 1000 * cpu_s / self.stats.requests


@dataclass(frozen=True, slots=True)
class Comparison:
    label: str
    off: Side
    on: Side
    # Latency p50 of "on" minus that of "off", round by round (ms): how far noise moves the difference.
    round_p50_deltas_ms: list[float]


def _delta_ms(on: float | None, off: float | None) -> str:
    if on is None or off is None:
        return "-"
    return f"{on - off:+.2f} ms"


def _delta_range(deltas: list[float]) -> str:
    if not deltas:
        return "-"
    return f"{min(deltas):+.2f} .. {max(deltas):+.2f} ms"


def _plain_ratio(num: float, den: float) -> str:
    return f"{num / den:.3f}×" if den > 0 else "-"


def _cpu_ms(side: Side, cpu_s: float | None) -> str:
    value = side.per_request_ms(cpu_s)
    return "-" if value is None else f"{value:.2f}"


def render_metering(*, header: list[str], columns: list[Comparison], footer: list[str]) -> str:
    table = PairTable(header, label=31, half=12, columns=len(columns))
    table.row("", [c.label.center(table.cell) for c in columns])
    table.pairs("", [("metering off", "metering on") for _ in columns])
    table.rule()
    metrics: list[tuple[str, Callable[[Side], str]]] = [
        ("requests measured", lambda s: str(s.stats.requests)),
        ("failed", lambda s: str(s.stats.failed)),
        ("latency p50 (ms)", lambda s: ms(s.stats.latency_p50_ms)),
        ("latency p99 (ms)", lambda s: ms(s.stats.latency_p99_ms)),
        ("TTFT p50 (ms)", lambda s: ms(s.stats.ttft_p50_ms)),
        ("TTFT p99 (ms)", lambda s: ms(s.stats.ttft_p99_ms)),
        ("requests/s", lambda s: rate(s.stats.requests_per_s)),
        ("gateway CPU per request (ms)", lambda s: _cpu_ms(s, s.gateway_cpu_s)),
        ("Postgres CPU per request (ms)", lambda s: _cpu_ms(s, s.postgres_cpu_s)),
    ]
    for label, cell in metrics:
        table.pairs(label, [(cell(c.off), cell(c.on)) for c in columns])
    table.rule()
    table.add("metering on vs off")
    differences: list[tuple[str, Callable[[Comparison], str]]] = [
        ("  latency p50, on - off", lambda c: _delta_ms(c.on.stats.latency_p50_ms, c.off.stats.latency_p50_ms)),
        ("    per round, min .. max", lambda c: _delta_range(c.round_p50_deltas_ms)),
        ("  latency p99, on - off", lambda c: _delta_ms(c.on.stats.latency_p99_ms, c.off.stats.latency_p99_ms)),
        ("  requests/s, on / off", lambda c: _plain_ratio(c.on.stats.requests_per_s, c.off.stats.requests_per_s)),
        (
            "  gateway CPU/req., on - off",
            lambda c: _delta_ms(c.on.per_request_ms(c.on.gateway_cpu_s), c.off.per_request_ms(c.off.gateway_cpu_s)),
        ),
        (
            "  Postgres CPU/req., on - off",
            lambda c: _delta_ms(c.on.per_request_ms(c.on.postgres_cpu_s), c.off.per_request_ms(c.off.postgres_cpu_s)),
        ),
    ]
    for label, delta in differences:
        table.row(label, [delta(c) for c in columns])
    table.rule()
    table.failures(
        "failed requests (by error):",
        [
            (f"metering {name} @ {c.label}", side.stats.errors)
            for c in columns
            for name, side in (("off", c.off), ("on", c.on))
        ],
    )
    return table.text(footer)


# ---- `failover` mode: a provider killed or asleep mid-answer -------------------------------


@dataclass(frozen=True, slots=True)
class FailoverColumn:
    """All rounds of one way of losing the provider (times in seconds)."""

    label: str
    rounds: int
    errors: Counter[str]
    stall_s: list[float]
    kill_to_next_s: list[float]
    kill_to_accepted_s: list[float]
    accepted_to_next_s: list[float]
    # Content chunks the buyer had when the signal went out.
    killed_after_chunks: list[int]
    normal_gaps_s: list[float]
    rejoin_s: list[float]
    # The gateway's 'failover' log lines: how many per stream, and their reasons.
    failovers_per_stream: Counter[int]
    reasons: Counter[str]

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def _ms_of(values: list[float], q: float) -> str:
    """A percentile of seconds, shown in ms."""
    p = percentile(values, q)
    return "-" if p is None else ms(p * 1000)


def _max_ms(values: list[float]) -> str:
    return "-" if not values else ms(max(values) * 1000)


def _min_ms(values: list[float]) -> str:
    return "-" if not values else ms(min(values) * 1000)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _chunks(values: list[int]) -> str:
    if not values:
        return "-"
    p50 = percentile([float(v) for v in values], 50)
    return f"{p50:.0f} / {max(values)}"


def render_failover(*, header: list[str], columns: list[FailoverColumn], footer: list[str]) -> str:
    table = Table(header, label=44, cell=26, columns=len(columns))
    table.row("", [c.label for c in columns])
    table.rule()
    metrics: list[tuple[str, Callable[[FailoverColumn], str]]] = [
        ("rounds (kills)", lambda c: str(c.rounds)),
        ("failed rounds", lambda c: str(c.failed)),
        ("signalled after content chunk p50 / max", lambda c: _chunks(c.killed_after_chunks)),
        ("buyer's stall p50 (ms)", lambda c: _ms_of(c.stall_s, 50)),
        ("buyer's stall p99 (ms)", lambda c: _ms_of(c.stall_s, 99)),
        ("buyer's stall max (ms)", lambda c: _max_ms(c.stall_s)),
        ("kill -> next token p50 (ms)", lambda c: _ms_of(c.kill_to_next_s, 50)),
        ("kill -> next token p99 (ms)", lambda c: _ms_of(c.kill_to_next_s, 99)),
        ("kill -> next token max (ms)", lambda c: _max_ms(c.kill_to_next_s)),
        ("  kill -> continuation accepted min (ms)", lambda c: _min_ms(c.kill_to_accepted_s)),
        ("  kill -> continuation accepted p50 (ms)", lambda c: _ms_of(c.kill_to_accepted_s, 50)),
        ("  kill -> continuation accepted max (ms)", lambda c: _max_ms(c.kill_to_accepted_s)),
        ("  accepted -> next token p50 (ms)", lambda c: _ms_of(c.accepted_to_next_s, 50)),
        ("  accepted -> next token max (ms)", lambda c: _max_ms(c.accepted_to_next_s)),
        ("baseline: normal inter-chunk gap p50 (ms)", lambda c: _ms_of(c.normal_gaps_s, 50)),
        ("baseline: normal inter-chunk gap p99 (ms)", lambda c: _ms_of(c.normal_gaps_s, 99)),
        ("baseline: normal inter-chunk gap max (ms)", lambda c: _max_ms(c.normal_gaps_s)),
        ("baseline: normal gaps measured", lambda c: f"{len(c.normal_gaps_s):,}"),
        ("back in the pool p50 (s)", lambda c: _seconds(percentile(c.rejoin_s, 50))),
        ("back in the pool max (s)", lambda c: _seconds(max(c.rejoin_s) if c.rejoin_s else None)),
        ("failovers per stream (gateway log)", lambda c: counts(c.failovers_per_stream)),
        ("failover reason (gateway log)", lambda c: counts(c.reasons)),
    ]
    for label, cell in metrics:
        table.row(label, [cell(c) for c in columns])
    table.rule()
    table.failures("failed rounds (by error):", [(c.label, c.errors) for c in columns])
    return table.text(footer)


# ---- `routing` mode: least-loaded vs random over daemons of uneven size ----------------------


@dataclass(frozen=True, slots=True)
class PolicySide:
    """One routing policy's measured rounds."""

    label: str
    stats: Stats
    # The short and the long requests alone (their latency and TTFT).
    short: Stats
    long: Stats
    # Aggregate tokens/s of each round alone.
    round_tps: list[float]
    # Requests each daemon (by provider id) finished for this policy's gateway.
    served: dict[str, int]


def _ratio_of(num: float | None, den: float | None) -> str:
    return "-" if num is None or not den else f"{num / den:.2f}×"


def _tps_range(values: list[float]) -> str:
    return "-" if not values else f"{rate(min(values))} .. {rate(max(values))}"


def _served(side: PolicySide, pid: str) -> str:
    total = sum(side.served.values())
    n = side.served.get(pid, 0)
    return f"{n} ({100 * n / total:.0f}%)" if total else "-"


def _compare(a: float | None, b: float | None) -> list[str]:
    """Two times in ms and their ratio."""
    return [ms(a), ms(b), _ratio_of(a, b)]


_Time = tuple[str, Callable[[Stats], float | None]]
_LATENCY: list[_Time] = [
    ("latency p50 (ms)", lambda s: s.latency_p50_ms),
    ("latency p99 (ms)", lambda s: s.latency_p99_ms),
]
_TTFT_P50: _Time = ("TTFT p50 (ms)", lambda s: s.ttft_p50_ms)
_TTFT_P99: _Time = ("TTFT p99 (ms)", lambda s: s.ttft_p99_ms)


def render_routing(
    *,
    header: list[str],
    sides: list[PolicySide],
    daemons: list[str],
    daemon_labels: list[str],
    footer: list[str],
) -> str:
    if len(sides) != 2:
        raise ValueError("two policies: the product's and the baseline")
    a, b = sides
    table = Table(header, label=34, cell=24, columns=3)
    table.row("", [a.label, b.label, f"{a.label.split()[0]} / {b.label.split()[0]}"])
    table.rule()
    table.row("requests measured", [str(a.stats.requests), str(b.stats.requests), ""])
    table.row("failed", [str(a.stats.failed), str(b.stats.failed), ""])
    tps, rps = (a.stats.throughput_tps, b.stats.throughput_tps), (a.stats.requests_per_s, b.stats.requests_per_s)
    table.row("aggregate throughput (tok/s)", [rate(tps[0]), rate(tps[1]), _ratio_of(*tps)])
    table.row("  per round, min .. max", [_tps_range(a.round_tps), _tps_range(b.round_tps), ""])
    table.row("requests/s", [rate(rps[0]), rate(rps[1]), _ratio_of(*rps)])
    for name, pick in [*_LATENCY, _TTFT_P50, _TTFT_P99]:
        table.row(name, _compare(pick(a.stats), pick(b.stats)))
    for kind, x, y in (("short", a.short, b.short), ("long", a.long, b.long)):
        for name, pick in [*_LATENCY, _TTFT_P99]:
            table.row(f"{kind} requests: {name}", _compare(pick(x), pick(y)))
    for pid, label in zip(daemons, daemon_labels, strict=True):
        table.row(f"served by {label}", [_served(a, pid), _served(b, pid), ""])
    table.rule()
    table.failures("failed requests (by error):", [(side.label, side.stats.errors) for side in sides])
    return table.text(footer)
