"""`python3 -m tests.bench` (`just bench`, the overhead mode): the gateway's own overhead over the bare engine.

nats-server, PostgreSQL, the control plane and one provider daemon on the synthetic
engine in a scratch directory; the same streamed requests go directly to an
in-process SyntheticEngine and via the gateway, at each concurrency level, and one
table puts the two side by side. Its options: `python3 -m tests.bench --help`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from tests.bench import harness
from tests.bench.harness import Verdict
from tests.bench.load import Direct, HttpClients, ViaGateway, drive, warmup
from tests.bench.machine import machine_lines
from tests.bench.progress import say
from tests.bench.prompts import MESSAGES
from tests.bench.report import Stats, render
from tests.bench.stack import RAISED_QUOTAS
from tests.bench.synthetic import MODEL_ID, SyntheticStack


@dataclass(frozen=True)
class Plan:
    levels: tuple[int, ...]
    tokens: int
    requests: int | None
    quick: bool
    streams_per_client: int
    default_quotas: bool

    def requests_for(self, concurrency: int) -> int:
        if self.requests is not None:
            return self.requests
        if self.quick:
            return max(8, 2 * concurrency)
        return max(16, 4 * concurrency)


def make_plan(args: argparse.Namespace, levels: tuple[int, ...]) -> Plan:
    return Plan(
        levels=levels,
        tokens=args.tokens,
        requests=args.requests,
        quick=args.quick,
        streams_per_client=args.streams_per_client,
        default_quotas=args.default_quotas,
    )


async def measure(plan: Plan, stack: SyntheticStack) -> tuple[list[Stats], list[Stats]]:
    direct = Direct(plan.tokens)
    direct_stats: list[Stats] = []
    via_stats: list[Stats] = []
    async with HttpClients(max(plan.levels), plan.streams_per_client) as clients:
        via = ViaGateway(clients, stack.base_url, stack.api_key, MODEL_ID, plan.tokens)
        for c in plan.levels:
            n, warm = plan.requests_for(c), warmup(c)
            await drive(direct, concurrency=c, requests=warm)
            d = Stats.of(await drive(direct, concurrency=c, requests=n))
            say(f"concurrency {c:>3}: direct      {n} requests in {d.wall_s:6.2f}s, {d.failed} failed")
            await drive(via, concurrency=c, requests=warm)
            v = Stats.of(await drive(via, concurrency=c, requests=n))
            say(f"concurrency {c:>3}: via gateway {n} requests in {v.wall_s:6.2f}s, {v.failed} failed")
            direct_stats.append(d)
            via_stats.append(v)
            stack.check_alive()
    return direct_stats, via_stats


def header(plan: Plan) -> list[str]:
    per_level = ", ".join(f"c={c}: {plan.requests_for(c)}" for c in plan.levels)
    warm = ", ".join(f"c={c}: {warmup(c)}" for c in plan.levels)
    n = plan.streams_per_client
    pool = f"{n} streams per client (encode/httpx#3215)" if n else "in one client for all streams"
    return [
        f"mac-provider gateway overhead benchmark ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})",
        "",
        "ENGINE: the SYNTHETIC stand-in (MP_ENGINE=synthetic). IT IS NOT A MODEL: it emits a fixed text, one token",
        "        per step, as fast as it can. These numbers measure the serving path, not inference speed.",
        f"measured: streamed chat completions, max_tokens={plan.tokens}, the same {len(MESSAGES)} messages every time;",
        f"          closed loop at each concurrency; measured requests per level: {per_level}",
        f"          (after an unmeasured warm-up round each way, {warm})",
        "  direct      = SyntheticEngine.prepare() + generate() in the benchmark process",
        "                (the engine only: no HTTP, no NATS)",
        "  via gateway = HTTP/1.1 POST /v1/chat/completions stream=true -> control plane -> NATS -> provider",
        "                daemon -> SyntheticEngine and back; client: httpx.AsyncClient, keep-alive connections pooled",
        f"                {pool}, SSE parsed in the benchmark process",
        *(
            ["quotas: the product's defaults (MP_QUOTA_* unset)"]
            if plan.default_quotas
            else [
                "quotas: metering on; the benchmark account's limits raised so that its own load is never refused:",
                "        " + ", ".join(f"{k}={v}" for k, v in RAISED_QUOTAS.items()),
            ]
        ),
        *machine_lines("the client, control plane, nats-server, daemon and PostgreSQL"),
    ]


FOOTER = [
    "TTFT: from sending the request to the first content token. decode tok/s: (tokens - 1) / (last token - first",
    "token), per request; via the gateway, tokens that arrive in one socket read share a timestamp. aggregate",
    "throughput: tokens of the successful requests / wall time of the level. p50/p99: nearest rank over the",
    "measured requests (below 100 requests, p99 is the slowest one). failed: HTTP error, in-band error, or not",
    "exactly max_tokens tokens ending in finish_reason=length. CPU: the benchmark process only (% of one core).",
]


def _verdict(result: tuple[list[Stats], list[Stats]]) -> Verdict:
    levels = [*result[0], *result[1]]
    # A level where nothing succeeded measured nothing: keep the logs that say why.
    hollow = any(s.failed == s.requests for s in levels)
    return Verdict(
        failed=any(s.failed for s in levels), hollow="no request succeeded at some level" if hollow else None
    )


def run(plan: Plan, *, keep_logs: bool, strict: bool) -> int:
    return harness.run(
        prefix="mp-bench-",
        stack=lambda home: SyntheticStack(home, gateway_env=None if plan.default_quotas else RAISED_QUOTAS),
        measure=lambda stack: measure(plan, stack),
        verdict=_verdict,
        table=lambda result, tail: render(
            header=header(plan), direct=result[0], via=result[1], footer=[*FOOTER, *tail]
        ),
        keep_logs=keep_logs,
        strict=strict,
    )
