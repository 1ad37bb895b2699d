"""Statistics per (path, concurrency) and the side-by-side plain-text table."""

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
        wall = max(level.wall_s, 1e-9)
        p50, p99 = percentile(ttfts, 50), percentile(ttfts, 99)
        return cls(
            concurrency=level.concurrency,
            requests=len(level.samples),
            failed=len(level.samples) - len(ok),
            ttft_p50_ms=p50,
            ttft_p99_ms=p99,
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
