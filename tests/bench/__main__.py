"""`python3 -m tests.bench [MODE]` (`just bench [MODE]`): side-by-side measurements of the serving path.

Modes:
  overhead  (the default) gateway overhead over the bare engine: starts nats-server,
            PostgreSQL, the control plane and one provider daemon on the synthetic
            engine in a scratch directory, and measures the same streamed requests
            directly against an in-process SyntheticEngine and via the gateway.
  metering  the cost of quotas + metering: the same stack with two control planes,
            MP_METERING=off and MP_METERING=on, and the same requests to each
            (streamed at each concurrency level, plus one non-streamed column).
  daemon    our provider daemon's local API vs mlx_lm.server on the same model
            (SmolLM2 by default): aggregate tokens/s and TTFT at concurrency 1, 2, 4, 8
            (options: python3 -m tests.bench daemon --help).
  failover  a provider killed (SIGKILL) or asleep (SIGSTOP) mid-answer: the buyer's stall until the next
            token, over repeated kills, beside the same streams' normal inter-chunk gaps; 3 daemons with
            the tiny real mlx-lm model (options: python3 -m tests.bench failover --help).
  structured  what response_format's constrained decoding costs in the worker's batch: free vs constrained
            requests alone and side by side, on SmolLM2 in process (options: python3 -m tests.bench structured --help).
  routing   least-loaded vs random routing over 3 tiny-model daemons of uneven size (MP_SLOTS 1, 2, 4)
            under a mix of long and short requests: tokens/s, requests/s, latency and TTFT
            (options: python3 -m tests.bench routing --help).

Each prints one table and stops everything it started (also on Ctrl-C or error).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from tests.bench import metering
from tests.bench.load import MESSAGES, Direct, HttpClients, ViaGateway, drive
from tests.bench.report import Stats, render
from tests.bench.stack import MODEL_ID, RAISED_QUOTAS, BenchStack, say

MODES = ("overhead", "metering")

DEFAULT_LEVELS = (1, 16, 64)
QUICK_LEVELS = (1, 16)


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

    @staticmethod
    def warmup_for(concurrency: int) -> int:
        # One round at the level's concurrency: also opens every pooled HTTP connection it needs.
        return max(4, concurrency)


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _levels(raw: str) -> tuple[int, ...]:
    try:
        levels = tuple(_positive(part) for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {raw!r} ({exc})") from None
    if not levels:
        raise argparse.ArgumentTypeError("at least one concurrency level")
    return levels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", choices=MODES, default="overhead", help="what to measure (default overhead)")
    parser.add_argument("--tokens", type=_positive, default=64, help="max_tokens of every request (default 64)")
    parser.add_argument(
        "--requests",
        type=_positive,
        default=None,
        help="measured requests per concurrency level (overhead: default 4x concurrency, at least 16) or per column"
        " and gateway (metering: default 24x concurrency, at least 640)",
    )
    parser.add_argument(
        "--concurrency",
        type=_levels,
        default=None,
        help="comma-separated concurrency levels of the streamed requests (default 1,16,64; 1,16 with --quick)",
    )
    parser.add_argument(
        "--streams-per-client",
        type=int,
        default=8,
        help="concurrent streams per httpx.AsyncClient pool (default 8; 0: one pool for all, see load.HttpClients)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: concurrency 1 and 16, fewer requests")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs) after the run")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any measured request failed")
    overhead = parser.add_argument_group("overhead mode only")
    overhead.add_argument(
        "--default-quotas",
        action="store_true",
        help="keep the product's default per-account quotas (concurrency 16 refuses part of the c=64 load)",
    )
    meter = parser.add_argument_group("metering mode only")
    meter.add_argument(
        "--rounds",
        type=_positive,
        default=None,
        help=f"rounds per column, the gateways' order alternating (default {metering.DEFAULT_ROUNDS};"
        f" {metering.QUICK_ROUNDS} with --quick)",
    )
    meter.add_argument(
        "--non-stream",
        type=int,
        default=None,
        metavar="C",
        help=f"concurrency of the non-streamed column (default {metering.DEFAULT_NON_STREAM}; 0: no such column)",
    )
    return parser


def parse_args(argv: list[str] | None) -> tuple[Plan, argparse.Namespace]:
    """The overhead mode's plan (ignore it in metering mode) and all arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    levels = args.concurrency or (QUICK_LEVELS if args.quick else DEFAULT_LEVELS)
    if args.streams_per_client < 0:
        parser.error("--streams-per-client must be 0 or more")
    if args.mode == "overhead":
        given = [
            flag for flag, value in (("--rounds", args.rounds), ("--non-stream", args.non_stream)) if value is not None
        ]
        if given:
            parser.error(f"{', '.join(given)}: metering mode only (python3 -m tests.bench metering ...)")
    elif args.default_quotas:
        parser.error("--default-quotas: overhead mode only (metering mode raises the quotas of both gateways)")
    if args.non_stream is not None and args.non_stream < 0:
        parser.error("--non-stream must be 0 or more")
    plan = Plan(
        levels=levels,
        tokens=args.tokens,
        requests=args.requests,
        quick=args.quick,
        streams_per_client=args.streams_per_client,
        default_quotas=args.default_quotas,
    )
    return plan, args


async def measure(plan: Plan, stack: BenchStack) -> tuple[list[Stats], list[Stats]]:
    direct = Direct(plan.tokens)
    direct_stats: list[Stats] = []
    via_stats: list[Stats] = []
    async with HttpClients(max(plan.levels), plan.streams_per_client) as clients:
        via = ViaGateway(clients, stack.base_url, stack.api_key, MODEL_ID, plan.tokens)
        for c in plan.levels:
            n, warm = plan.requests_for(c), plan.warmup_for(c)
            await drive(direct, concurrency=c, requests=warm)
            d = Stats.of(await drive(direct, concurrency=c, requests=n))
            say(f"concurrency {c:>3}: direct      {n} requests in {d.wall_s:6.2f}s, {d.failed} failed")
            await drive(via, concurrency=c, requests=warm)
            v = Stats.of(await drive(via, concurrency=c, requests=n))
            say(f"concurrency {c:>3}: via gateway {n} requests in {v.wall_s:6.2f}s, {v.failed} failed")
            direct_stats.append(d)
            via_stats.append(v)
            dead = stack.dead_children()
            if dead:
                tails = "\n".join(f"--- {child.name}:\n{child.log_tail()}" for child in dead)
                raise RuntimeError(f"{', '.join(c.name for c in dead)} died during the benchmark\n{tails}")
    return direct_stats, via_stats


def _cores() -> str:
    total = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        usable = total
    return f"{usable} CPU cores" + ("" if usable == total else f" usable (of {total})")


def header(plan: Plan) -> list[str]:
    per_level = ", ".join(f"c={c}: {plan.requests_for(c)}" for c in plan.levels)
    warm = ", ".join(f"c={c}: {plan.warmup_for(c)}" for c in plan.levels)
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
        f"machine: {_cores()}, {platform.system()} {platform.machine()}, Python {platform.python_version()};",
        "         the client, control plane, nats-server, daemon and PostgreSQL all share these cores",
    ]


FOOTER = [
    "TTFT: from sending the request to the first content token. decode tok/s: (tokens - 1) / (last token - first",
    "token), per request; via the gateway, tokens that arrive in one socket read share a timestamp. aggregate",
    "throughput: tokens of the successful requests / wall time of the level. p50/p99: nearest rank over the",
    "measured requests (below 100 requests, p99 is the slowest one). failed: HTTP error, in-band error, or not",
    "exactly max_tokens tokens ending in finish_reason=length. CPU: the benchmark process only (% of one core).",
]


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["daemon"]:
        # Its own options and stack (tests/bench/daemon.py): our daemon vs mlx_lm.server.
        from tests.bench import daemon

        return daemon.main(argv[1:])
    # Their own options and stacks (tests/bench/failover.py, routing.py): daemons with the tiny real model.
    if argv[:1] == ["failover"]:
        signal.signal(signal.SIGTERM, _on_sigterm)
        from tests.bench import failover

        return failover.main(argv[1:])
    if argv[:1] == ["structured"]:
        from tests.bench import structured

        return structured.main(argv[1:])
    if argv[:1] == ["routing"]:
        signal.signal(signal.SIGTERM, _on_sigterm)
        from tests.bench import routing

        return routing.main(argv[1:])
    plan, args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.mode == "metering":
        return metering.run(
            metering.make_plan(args, plan.levels), keep_logs=args.keep, strict=args.strict, machine=_cores()
        )
    started = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="mp-bench-"))
    stack = BenchStack(home, gateway_env=None if plan.default_quotas else RAISED_QUOTAS)
    # Logs stay for a post-mortem when the run fails; a finished or interrupted run cleans up.
    keep = True
    try:
        say(f"scratch directory {home}")
        stack.start()
        direct, via = asyncio.run(measure(plan, stack))
        # A level where nothing succeeded measured nothing: keep the logs that say why.
        hollow = [s for s in [*direct, *via] if s.failed == s.requests]
        keep = args.keep or bool(hollow)
    except KeyboardInterrupt:
        say("interrupted")
        keep = args.keep
        return 130
    finally:
        stack.stop()
        if keep:
            say(f"logs kept in {home}/logs")
        else:
            shutil.rmtree(home, ignore_errors=True)
    footer = [*FOOTER, f"(whole run incl. starting and stopping the stack: {time.monotonic() - started:.0f}s)"]
    print(render(header=header(plan), direct=direct, via=via, footer=footer), flush=True)
    if hollow:
        say("no request succeeded at some level (see 'failed requests' above and the logs); exit 1")
        return 1
    if args.strict and any(s.failed for s in [*direct, *via]):
        say("--strict: some requests failed; exit 1")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
