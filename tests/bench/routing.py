"""`python3 -m tests.bench routing` (`just bench routing`): least-loaded routing vs random, under uneven load.

One nats-server, one PostgreSQL, 3 provider daemons serving the SAME model id
with the tiny real mlx-lm model but of uneven size (MP_SLOTS 1, 2 and 4), and
two control planes on them that differ only in MP_ROUTING (least-loaded, the
product's default, and random, the baseline). The same mix of requests (mostly
short, every 8th long) goes to both at the same concurrency, in rounds whose
order alternates; one table puts aggregate tokens/s, requests/s, latency and
TTFT side by side with their ratio. Everything started is stopped again, also
on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.bench import cli, harness
from tests.bench.chat import chat_body, stream_chat
from tests.bench.harness import Verdict
from tests.bench.load import Level, Sample, drive
from tests.bench.machine import machine_lines
from tests.bench.pool import MODEL_ID, MODEL_SEED, DaemonSpec, PoolStack
from tests.bench.progress import say
from tests.bench.prompts import numbered
from tests.bench.report import PolicySide, Stats, render_routing
from tests.bench.stack import RAISED_QUOTAS, GatewaySpec

LEAST_LOADED = "least-loaded"
RANDOM = "random"
POLICIES = (LEAST_LOADED, RANDOM)
LABELS = ("least-loaded (default)", "random (baseline)")

DEFAULT_SLOTS = (1, 2, 4)
DEFAULT_CONCURRENCY = 8
DEFAULT_ROUNDS = 6
QUICK_ROUNDS = 2
DEFAULT_REQUESTS = 48
QUICK_REQUESTS = 32
DEFAULT_SHORT = 50
DEFAULT_LONG = 1000
DEFAULT_LONG_EVERY = 8
# The product's default heartbeat, set explicitly so that the header states what ran.
HEARTBEAT_S = 1.0


@dataclass(frozen=True)
class RoutingPlan:
    slots: tuple[int, ...]
    concurrency: int
    rounds: int
    requests: int
    short_tokens: int
    long_tokens: int
    long_every: int

    def is_long(self, index: int) -> bool:
        """The round's index-th request: every `long_every`-th one (the first included) is long."""
        return index % self.long_every == 0

    @property
    def longs_per_round(self) -> int:
        return len(range(0, self.requests, self.long_every))

    def warmup(self) -> int:
        return self.concurrency


_slots = cli.positive_list(at_least=2, too_few="at least two daemons (routing needs a choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__, "routing")
    parser.add_argument(
        "--slots",
        type=_slots,
        default=DEFAULT_SLOTS,
        help="MP_SLOTS of each daemon, one daemon per number (default 1,2,4)",
    )
    parser.add_argument(
        "--concurrency",
        type=cli.positive,
        default=DEFAULT_CONCURRENCY,
        help=f"requests in flight, closed loop (default {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument(
        "--rounds",
        type=cli.positive,
        default=None,
        help=f"rounds per policy, their order alternating (default {DEFAULT_ROUNDS}; {QUICK_ROUNDS} with --quick)",
    )
    parser.add_argument(
        "--requests",
        type=cli.positive,
        default=None,
        help=f"requests per round and policy (default {DEFAULT_REQUESTS}; {QUICK_REQUESTS} with --quick)",
    )
    parser.add_argument(
        "--short-tokens",
        type=cli.positive,
        default=DEFAULT_SHORT,
        help=f"max_tokens of short requests ({DEFAULT_SHORT})",
    )
    parser.add_argument(
        "--long-tokens", type=cli.positive, default=DEFAULT_LONG, help=f"max_tokens of long requests ({DEFAULT_LONG})"
    )
    parser.add_argument(
        "--long-every",
        type=cli.positive,
        default=DEFAULT_LONG_EVERY,
        help=f"every N-th request is long (default {DEFAULT_LONG_EVERY}; 1: all long)",
    )
    cli.add_run_flags(parser, quick="smoke run: fewer and smaller rounds")
    return parser


def make_plan(argv: list[str]) -> tuple[RoutingPlan, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    plan = RoutingPlan(
        slots=args.slots,
        concurrency=args.concurrency,
        rounds=args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS),
        requests=args.requests or (QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS),
        short_tokens=args.short_tokens,
        long_tokens=args.long_tokens,
        long_every=args.long_every,
    )
    return plan, args


# Numbers every prompt of the run: no two are the same, so no daemon's prompt cache favours either policy.
_PROMPTS = itertools.count(1)


class _Sender:
    """One round's requests to one gateway, in the plan's order."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, auth: dict[str, str], plan: RoutingPlan) -> None:
        self.client = client
        self.url = f"{base_url}/v1/chat/completions"
        self.auth = auth
        self.plan = plan
        self._index = itertools.count()
        # (long or not, what the buyer saw) of every request.
        self.sent: list[tuple[bool, Sample]] = []

    async def __call__(self, worker: int) -> Sample:
        long = self.plan.is_long(next(self._index))
        max_tokens = self.plan.long_tokens if long else self.plan.short_tokens
        prompt = numbered(next(_PROMPTS), "write a story about")
        streamed = await stream_chat(
            self.client, self.url, self.auth, chat_body(prompt, max_tokens, model=MODEL_ID), max_tokens
        )
        sample = streamed.sample()
        self.sent.append((long, sample))
        return sample


@dataclass
class _Tally:
    """One policy's measured rounds."""

    levels: list[Level] = field(default_factory=list)
    sent: list[tuple[bool, Sample]] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)

    def side(self, label: str) -> PolicySide:
        merged = Level.merge(self.levels)
        shorts = [sample for is_long, sample in self.sent if not is_long]
        longs = [sample for is_long, sample in self.sent if is_long]
        return PolicySide(
            label=label,
            stats=Stats.of(merged),
            short=Stats.of(Level(merged.concurrency, shorts, merged.wall_s, 0.0)),
            long=Stats.of(Level(merged.concurrency, longs, merged.wall_s, 0.0)),
            round_tps=[Stats.of(level).throughput_tps for level in self.levels],
            served=dict(self.served),
        )


def _order(r: int) -> tuple[str, str]:
    return POLICIES if r % 2 == 0 else (POLICIES[1], POLICIES[0])


async def _served(stack: PoolStack, client: httpx.AsyncClient) -> dict[str, int]:
    return {pid: await stack.served(client, daemon) for pid, daemon in stack.daemons.items()}


async def measure(plan: RoutingPlan, stack: PoolStack) -> dict[str, _Tally]:
    tallies = {policy: _Tally() for policy in POLICIES}
    limits = httpx.Limits(max_connections=plan.concurrency, max_keepalive_connections=plan.concurrency)
    timeout = httpx.Timeout(300.0, connect=10.0, pool=300.0)
    async with (
        httpx.AsyncClient(limits=limits, timeout=timeout) as least,
        httpx.AsyncClient(limits=limits, timeout=timeout) as rand,
        httpx.AsyncClient() as admin,
    ):
        clients = {LEAST_LOADED: least, RANDOM: rand}
        for policy in POLICIES:
            sender = _Sender(clients[policy], stack.gateways[policy].base_url, stack.auth, plan)
            await drive(sender, concurrency=plan.concurrency, requests=plan.warmup())
        for r in range(plan.rounds):
            # Whoever went first last round goes second now: neither side always follows the other.
            for policy in _order(r):
                await stack.wait_pool(within_s=60)
                sender = _Sender(clients[policy], stack.gateways[policy].base_url, stack.auth, plan)
                before = await _served(stack, admin)
                level = await drive(sender, concurrency=plan.concurrency, requests=plan.requests)
                after = await _served(stack, admin)
                tally = tallies[policy]
                tally.levels.append(level)
                tally.sent.extend(sender.sent)
                for pid, n in after.items():
                    tally.served[pid] = tally.served.get(pid, 0) + n - before.get(pid, 0)
                s = Stats.of(level)
                say(
                    f"round {r + 1}/{plan.rounds} {policy:<12} {s.requests} requests in {s.wall_s:6.2f}s: "
                    f"{s.throughput_tps:6.1f} tok/s, {s.failed} failed"
                )
                stack.check_alive()
    return tallies


def _daemon_ids(plan: RoutingPlan) -> list[str]:
    return [f"slots{n}-{chr(ord('a') + i)}" for i, n in enumerate(plan.slots)]


def header(plan: RoutingPlan) -> list[str]:
    longs = plan.longs_per_round
    mean = (longs * plan.long_tokens + (plan.requests - longs) * plan.short_tokens) / plan.requests
    slots = ", ".join(map(str, plan.slots))
    quotas = ", ".join(f"{k}={v}" for k, v in RAISED_QUOTAS.items())
    return [
        f"mac-provider routing benchmark: least-loaded vs random under uneven load "
        f"({time.strftime('%Y-%m-%d %H:%M:%S %Z')})",
        "",
        f"MODEL: the tiny real mlx-lm model of the tests (tests/support/tiny_model.py, seed {MODEL_SEED}: a 2-layer",
        "       llama with random weights that never emits EOS), so every request runs to its max_tokens.",
        f"pool: one nats-server, one PostgreSQL, {len(plan.slots)} provider daemons serving the same model id,",
        f"      of uneven size: MP_SLOTS = {slots} (sequences decoded together; more wait in the daemon's queue),",
        f"      MP_HEARTBEAT_S={HEARTBEAT_S:g} (the default); and TWO control planes on them that differ only in",
        "      MP_ROUTING:",
        "  least-loaded = the product's default (services/gateway/pool.py PoolView.candidates): a provider with a",
        "                 free slot first, then the least busy per slot (running + queued from its last heartbeat,",
        "                 plus what this gateway sent it since), then the fastest decoder (heartbeat decode_tps)",
        "  random       = the baseline: a random provider among those with room (a free slot or queue space)",
        "      Both with the benchmark account's quotas raised so that the load is never refused:",
        f"        {quotas}",
        f"load: streamed greedy chat completions, closed loop at concurrency {plan.concurrency}. Each round:",
        f"      {plan.requests} requests, every {plan.long_every}th long (max_tokens={plan.long_tokens}), the rest"
        f" short (max_tokens={plan.short_tokens}),",
        f"      {mean:.0f} tokens per request on average; the same sequence for both policies; every prompt new",
        "      (one user message: nothing to route by conversation, no prompt-cache favours).",
        f"      {plan.rounds} rounds per policy: each round runs one gateway, then the other, who goes first",
        "      alternating; before each, every pool must hold all daemons, none busy. After an unmeasured",
        f"      warm-up of {plan.warmup()} requests each.",
        *machine_lines("the client, both control planes, nats-server, daemons and PostgreSQL"),
    ]


FOOTER = [
    "aggregate throughput: completion tokens (usage) of the successful requests / wall time summed over the policy's",
    "rounds (each round until its last request ended). requests/s likewise. latency: sending the request to the",
    "end of the stream; TTFT: to the first content chunk. p50/p99: nearest rank. served by: requests each daemon",
    "finished for that gateway (its /admin/status pool.served). per round: aggregate tok/s of each round alone.",
    "failed: HTTP error, in-band error, or not exactly max_tokens tokens ending in finish_reason=length.",
]


def _stack(plan: RoutingPlan, home: Path) -> PoolStack:
    gateways = [GatewaySpec(policy, {**RAISED_QUOTAS, "MP_ROUTING": policy}) for policy in POLICIES]
    daemons = [
        DaemonSpec(pid, {"MP_SLOTS": str(n), "MP_HEARTBEAT_S": f"{HEARTBEAT_S:g}"})
        for pid, n in zip(_daemon_ids(plan), plan.slots, strict=True)
    ]
    return PoolStack(home, gateways=gateways, daemons=daemons)


async def _sides(plan: RoutingPlan, stack: PoolStack) -> list[PolicySide]:
    tallies = await measure(plan, stack)
    return [tallies[policy].side(label) for policy, label in zip(POLICIES, LABELS, strict=True)]


def _verdict(sides: list[PolicySide]) -> Verdict:
    hollow = any(side.stats.failed == side.stats.requests for side in sides)
    return Verdict(
        failed=any(side.stats.failed for side in sides),
        hollow="no request succeeded for some policy" if hollow else None,
    )


def _table(plan: RoutingPlan, sides: list[PolicySide], tail: list[str]) -> str:
    served_labels = [f"slots={n} ({pid})" for pid, n in zip(_daemon_ids(plan), plan.slots, strict=True)]
    return render_routing(
        header=header(plan),
        sides=sides,
        daemons=_daemon_ids(plan),
        daemon_labels=served_labels,
        footer=[*FOOTER, *tail],
    )


def run(plan: RoutingPlan, *, keep_logs: bool, strict: bool) -> int:
    return harness.run(
        prefix="mp-bench-routing-",
        stack=lambda home: _stack(plan, home),
        measure=lambda stack: _sides(plan, stack),
        verdict=_verdict,
        table=lambda sides, tail: _table(plan, sides, tail),
        keep_logs=keep_logs,
        strict=strict,
        load_line=True,
    )


def main(argv: list[str]) -> int:
    plan, args = make_plan(argv)
    return run(plan, keep_logs=args.keep, strict=args.strict)
