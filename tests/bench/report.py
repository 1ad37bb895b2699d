"""Statistics per (path, concurrency) and the side-by-side plain-text tables of every mode."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from tests.bench.load import Level


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


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


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


LABEL = 31
CELL = 13


def render(
    *,
    header: list[str],
    direct: list[Stats],
    via: list[Stats],
    footer: list[str],
) -> str:
    group = 2 * CELL + 1
    lines = list(header)
    lines.append("")
    rule = "-" * (LABEL + len(direct) * (group + 3))

    def row(label: str, cells: list[str]) -> str:
        return label.ljust(LABEL) + "".join(" | " + c for c in cells)

    def pair(d: str, v: str) -> str:
        return d.rjust(CELL) + " " + v.rjust(CELL)

    lines.append(row("", [f"concurrency {d.concurrency}".center(group) for d in direct]))
    lines.append(row("", [pair("direct", "via gateway") for _ in direct]))
    lines.append(rule)
    metrics: list[tuple[str, list[tuple[str, str]]]] = [
        ("requests measured", [(str(d.requests), str(v.requests)) for d, v in zip(direct, via, strict=True)]),
        ("failed", [(str(d.failed), str(v.failed)) for d, v in zip(direct, via, strict=True)]),
        ("TTFT p50 (ms)", [(_ms(d.ttft_p50_ms), _ms(v.ttft_p50_ms)) for d, v in zip(direct, via, strict=True)]),
        ("TTFT p99 (ms)", [(_ms(d.ttft_p99_ms), _ms(v.ttft_p99_ms)) for d, v in zip(direct, via, strict=True)]),
        (
            "decode tok/s per request, p50",
            [(_rate(d.decode_tps_p50), _rate(v.decode_tps_p50)) for d, v in zip(direct, via, strict=True)],
        ),
        (
            "aggregate throughput (tok/s)",
            [(_rate(d.throughput_tps), _rate(v.throughput_tps)) for d, v in zip(direct, via, strict=True)],
        ),
        ("requests/s", [(_rate(d.requests_per_s), _rate(v.requests_per_s)) for d, v in zip(direct, via, strict=True)]),
        ("wall time (ms)", [(_ms(d.wall_s * 1000), _ms(v.wall_s * 1000)) for d, v in zip(direct, via, strict=True)]),
        (
            "benchmark process CPU (%)",
            [(_pct(d.cpu_s, d.wall_s), _pct(v.cpu_s, v.wall_s)) for d, v in zip(direct, via, strict=True)],
        ),
    ]
    for label, cells in metrics:
        lines.append(row(label, [pair(d, v) for d, v in cells]))
    lines.append(rule)
    lines.append("gateway overhead")
    lines.append(
        row("  TTFT p50, via minus direct", [_ttft_delta(v, d).rjust(group) for d, v in zip(direct, via, strict=True)])
    )
    lines.append(
        row(
            "  throughput, via / direct",
            [_ratio(v.throughput_tps, d.throughput_tps).rjust(group) for d, v in zip(direct, via, strict=True)],
        )
    )
    lines.append(rule)
    failures = [
        f"  {path} @ concurrency {s.concurrency}: " + ", ".join(f"{code} ×{n}" for code, n in s.errors.most_common())
        for path, stats in (("direct", direct), ("via gateway", via))
        for s in stats
        if s.errors
    ]
    if failures:
        lines.append("failed requests (by error):")
        lines.extend(failures)
    lines.extend(footer)
    return "\n".join(lines)


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


M_LABEL = 31
M_CELL = 12


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


def render_metering(*, header: list[str], columns: list[Comparison], footer: list[str]) -> str:
    group = 2 * M_CELL + 1
    lines = [*header, ""]
    rule = "-" * (M_LABEL + len(columns) * (group + 3))

    def row(label: str, cells: list[str]) -> str:
        return label.ljust(M_LABEL) + "".join(" | " + c for c in cells)

    def pair(off: str, on: str) -> str:
        return off.rjust(M_CELL) + " " + on.rjust(M_CELL)

    def cpu(side: Side, cpu_s: float | None) -> str:
        value = side.per_request_ms(cpu_s)
        return "-" if value is None else f"{value:.2f}"

    lines.append(row("", [c.label.center(group) for c in columns]))
    lines.append(row("", [pair("metering off", "metering on") for _ in columns]))
    lines.append(rule)
    metrics: list[tuple[str, list[tuple[str, str]]]] = [
        ("requests measured", [(str(c.off.stats.requests), str(c.on.stats.requests)) for c in columns]),
        ("failed", [(str(c.off.stats.failed), str(c.on.stats.failed)) for c in columns]),
        ("latency p50 (ms)", [(_ms(c.off.stats.latency_p50_ms), _ms(c.on.stats.latency_p50_ms)) for c in columns]),
        ("latency p99 (ms)", [(_ms(c.off.stats.latency_p99_ms), _ms(c.on.stats.latency_p99_ms)) for c in columns]),
        ("TTFT p50 (ms)", [(_ms(c.off.stats.ttft_p50_ms), _ms(c.on.stats.ttft_p50_ms)) for c in columns]),
        ("TTFT p99 (ms)", [(_ms(c.off.stats.ttft_p99_ms), _ms(c.on.stats.ttft_p99_ms)) for c in columns]),
        ("requests/s", [(_rate(c.off.stats.requests_per_s), _rate(c.on.stats.requests_per_s)) for c in columns]),
        (
            "gateway CPU per request (ms)",
            [(cpu(c.off, c.off.gateway_cpu_s), cpu(c.on, c.on.gateway_cpu_s)) for c in columns],
        ),
        (
            "Postgres CPU per request (ms)",
            [(cpu(c.off, c.off.postgres_cpu_s), cpu(c.on, c.on.postgres_cpu_s)) for c in columns],
        ),
    ]
    for label, cells in metrics:
        lines.append(row(label, [pair(off, on) for off, on in cells]))
    lines.append(rule)

    def cpu_delta(on: Side, on_s: float | None, off: Side, off_s: float | None) -> str:
        return _delta_ms(on.per_request_ms(on_s), off.per_request_ms(off_s))

    lines.append("metering on vs off")
    differences: list[tuple[str, list[str]]] = [
        (
            "  latency p50, on - off",
            [_delta_ms(c.on.stats.latency_p50_ms, c.off.stats.latency_p50_ms) for c in columns],
        ),
        ("    per round, min .. max", [_delta_range(c.round_p50_deltas_ms) for c in columns]),
        (
            "  latency p99, on - off",
            [_delta_ms(c.on.stats.latency_p99_ms, c.off.stats.latency_p99_ms) for c in columns],
        ),
        (
            "  requests/s, on / off",
            [_plain_ratio(c.on.stats.requests_per_s, c.off.stats.requests_per_s) for c in columns],
        ),
        (
            "  gateway CPU/req., on - off",
            [cpu_delta(c.on, c.on.gateway_cpu_s, c.off, c.off.gateway_cpu_s) for c in columns],
        ),
        (
            "  Postgres CPU/req., on - off",
            [cpu_delta(c.on, c.on.postgres_cpu_s, c.off, c.off.postgres_cpu_s) for c in columns],
        ),
    ]
    for label, deltas in differences:
        lines.append(row(label, [d.rjust(group) for d in deltas]))
    lines.append(rule)
    failures = [
        f"  metering {side} @ {c.label}: " + ", ".join(f"{code} ×{n}" for code, n in stats.errors.most_common())
        for c in columns
        for side, stats in (("off", c.off.stats), ("on", c.on.stats))
        if stats.errors
    ]
    if failures:
        lines.append("failed requests (by error):")
        lines.extend(failures)
    lines.extend(footer)
    return "\n".join(lines)


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


F_LABEL = 44
F_CELL = 26


def _ms_of(values: list[float], q: float) -> str:
    """A percentile of seconds, shown in ms."""
    p = percentile(values, q)
    return "-" if p is None else _ms(p * 1000)


def _max_ms(values: list[float]) -> str:
    return "-" if not values else _ms(max(values) * 1000)


def _min_ms(values: list[float]) -> str:
    return "-" if not values else _ms(min(values) * 1000)


def _counts(counter: Counter[str] | Counter[int]) -> str:
    return ", ".join(f"{key} ×{n}" for key, n in counter.most_common()) or "-"


def render_failover(*, header: list[str], columns: list[FailoverColumn], footer: list[str]) -> str:
    lines = [*header, ""]
    rule = "-" * (F_LABEL + len(columns) * (F_CELL + 3))

    def row(label: str, cells: list[str]) -> str:
        return label.ljust(F_LABEL) + "".join(" | " + c.rjust(F_CELL) for c in cells)

    lines.append(row("", [c.label for c in columns]))
    lines.append(rule)
    metrics: list[tuple[str, list[str]]] = [
        ("rounds (kills)", [str(c.rounds) for c in columns]),
        ("failed rounds", [str(c.failed) for c in columns]),
        (
            "signalled after content chunk p50 / max",
            [_chunks(c.killed_after_chunks) for c in columns],
        ),
        ("buyer's stall p50 (ms)", [_ms_of(c.stall_s, 50) for c in columns]),
        ("buyer's stall p99 (ms)", [_ms_of(c.stall_s, 99) for c in columns]),
        ("buyer's stall max (ms)", [_max_ms(c.stall_s) for c in columns]),
        ("kill -> next token p50 (ms)", [_ms_of(c.kill_to_next_s, 50) for c in columns]),
        ("kill -> next token p99 (ms)", [_ms_of(c.kill_to_next_s, 99) for c in columns]),
        ("kill -> next token max (ms)", [_max_ms(c.kill_to_next_s) for c in columns]),
        ("  kill -> continuation accepted min (ms)", [_min_ms(c.kill_to_accepted_s) for c in columns]),
        ("  kill -> continuation accepted p50 (ms)", [_ms_of(c.kill_to_accepted_s, 50) for c in columns]),
        ("  kill -> continuation accepted max (ms)", [_max_ms(c.kill_to_accepted_s) for c in columns]),
        ("  accepted -> next token p50 (ms)", [_ms_of(c.accepted_to_next_s, 50) for c in columns]),
        ("  accepted -> next token max (ms)", [_max_ms(c.accepted_to_next_s) for c in columns]),
        ("baseline: normal inter-chunk gap p50 (ms)", [_ms_of(c.normal_gaps_s, 50) for c in columns]),
        ("baseline: normal inter-chunk gap p99 (ms)", [_ms_of(c.normal_gaps_s, 99) for c in columns]),
        ("baseline: normal inter-chunk gap max (ms)", [_max_ms(c.normal_gaps_s) for c in columns]),
        ("baseline: normal gaps measured", [f"{len(c.normal_gaps_s):,}" for c in columns]),
        ("back in the pool p50 (s)", [_seconds(percentile(c.rejoin_s, 50)) for c in columns]),
        ("back in the pool max (s)", [_seconds(max(c.rejoin_s) if c.rejoin_s else None) for c in columns]),
        ("failovers per stream (gateway log)", [_counts(c.failovers_per_stream) for c in columns]),
        ("failover reason (gateway log)", [_counts(c.reasons) for c in columns]),
    ]
    for label, cells in metrics:
        lines.append(row(label, cells))
    lines.append(rule)
    failures = [f"  {c.label}: {_counts(c.errors)}" for c in columns if c.errors]
    if failures:
        lines.append("failed rounds (by error):")
        lines.extend(failures)
    lines.extend(footer)
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


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


R_LABEL = 34
R_CELL = 24


def _ratio_of(num: float | None, den: float | None) -> str:
    return "-" if num is None or not den else f"{num / den:.2f}×"


def _tps_range(values: list[float]) -> str:
    return "-" if not values else f"{_rate(min(values))} .. {_rate(max(values))}"


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
    lines = [*header, ""]
    rule = "-" * (R_LABEL + 3 * (R_CELL + 3))

    def row(label: str, cells: list[str]) -> str:
        return label.ljust(R_LABEL) + "".join(" | " + c.rjust(R_CELL) for c in cells)

    def served(side: PolicySide, pid: str) -> str:
        total = sum(side.served.values())
        n = side.served.get(pid, 0)
        return f"{n} ({100 * n / total:.0f}%)" if total else "-"

    lines.append(row("", [a.label, b.label, f"{a.label.split()[0]} / {b.label.split()[0]}"]))
    lines.append(rule)
    rows: list[tuple[str, str, str, str]] = [
        ("requests measured", str(a.stats.requests), str(b.stats.requests), ""),
        ("failed", str(a.stats.failed), str(b.stats.failed), ""),
        (
            "aggregate throughput (tok/s)",
            _rate(a.stats.throughput_tps),
            _rate(b.stats.throughput_tps),
            _ratio_of(a.stats.throughput_tps, b.stats.throughput_tps),
        ),
        ("  per round, min .. max", _tps_range(a.round_tps), _tps_range(b.round_tps), ""),
        (
            "requests/s",
            _rate(a.stats.requests_per_s),
            _rate(b.stats.requests_per_s),
            _ratio_of(a.stats.requests_per_s, b.stats.requests_per_s),
        ),
    ]
    for name, pick in (
        ("latency p50 (ms)", lambda s: s.latency_p50_ms),
        ("latency p99 (ms)", lambda s: s.latency_p99_ms),
        ("TTFT p50 (ms)", lambda s: s.ttft_p50_ms),
        ("TTFT p99 (ms)", lambda s: s.ttft_p99_ms),
    ):
        rows.append((name, _ms(pick(a.stats)), _ms(pick(b.stats)), _ratio_of(pick(a.stats), pick(b.stats))))
    for kind, pa, pb in (("short", a.short, b.short), ("long", a.long, b.long)):
        for name, pick in (
            ("latency p50 (ms)", lambda s: s.latency_p50_ms),
            ("latency p99 (ms)", lambda s: s.latency_p99_ms),
            ("TTFT p99 (ms)", lambda s: s.ttft_p99_ms),
        ):
            rows.append((f"{kind} requests: {name}", _ms(pick(pa)), _ms(pick(pb)), _ratio_of(pick(pa), pick(pb))))
    for pid, label in zip(daemons, daemon_labels, strict=True):
        rows.append((f"served by {label}", served(a, pid), served(b, pid), ""))
    for label, x, y, ratio in rows:
        lines.append(row(label, [x, y, ratio]))
    lines.append(rule)
    failures = [
        f"  {side.label}: " + ", ".join(f"{code} ×{n}" for code, n in side.stats.errors.most_common())
        for side in sides
        if side.stats.errors
    ]
    if failures:
        lines.append("failed requests (by error):")
        lines.extend(failures)
    lines.extend(footer)
    return "\n".join(lines)


def _chunks(values: list[int]) -> str:
    if not values:
        return "-"
    p50 = percentile([float(v) for v in values], 50)
    return f"{p50:.0f} / {max(values)}"
