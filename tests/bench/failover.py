"""`python3 -m tests.bench failover` (`just bench failover`): how long the buyer waits when a provider dies mid-answer.

One nats-server, one PostgreSQL, one control plane, and 3 provider daemons
serving the SAME model id with the tiny real mlx-lm model (heartbeats every
0.5 s). Round after round, one greedy streamed chat completion runs; once 20
content chunks arrived, the daemon running it is SIGKILLed ("process killed") or
SIGSTOPped with its worker ("Mac asleep"), and the buyer's wait is timed: from
the signal (and from the last token before it) to the next token. Every stream must
still end normally (no in-band error, finish_reason=length, usage = max_tokens,
the same text as an unbroken answer). Then the victim is restarted under the
same provider id (or continued with SIGCONT) and the next round waits until
every pool shows it again. The two columns' rounds alternate; as the baseline,
the same streams' ordinary inter-chunk gaps outside the failover window sit
beside them. Everything started is stopped again, also on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from infra.components import DaemonChild
from tests.bench import cli, harness
from tests.bench.chat import OnChunk, Streamed, chat_body, stream_chat
from tests.bench.harness import Verdict
from tests.bench.machine import machine_lines
from tests.bench.pool import MODEL_ID, MODEL_SEED, DaemonSpec, PoolStack
from tests.bench.progress import say
from tests.bench.report import FailoverColumn, render_failover
from tests.bench.stack import RAISED_QUOTAS, GatewaySpec
from tests.support import logs

KILL = "kill"
SLEEP = "sleep"
LABELS = {KILL: "process killed (SIGKILL)", SLEEP: "Mac asleep (SIGSTOP)"}

PROMPT = "Tell me a long story about the sea."
DEFAULT_ROUNDS = 12
QUICK_ROUNDS = 3
DEFAULT_TOKENS = 500
DEFAULT_KILL_AT = 20
DEFAULT_DAEMONS = 3
HEARTBEAT_S = 0.5
# The gateway's defaults, set explicitly so that the header states what ran.
LOST_AFTER_INTERVALS = 2
HEARTBEAT_MISSES = 3
# How often Call._next wakes up to check the provider's heartbeats (services/gateway/dispatch.py _TICK_S).
DISPATCH_TICK_S = 0.25
GATEWAY = "gateway"


@dataclass(frozen=True)
class FailoverPlan:
    columns: tuple[str, ...]
    rounds: int
    tokens: int
    kill_at: int
    daemons: int
    heartbeat_s: float

    def schedule(self) -> list[str]:
        """The rounds in the order they run: the columns alternate."""
        return [column for _ in range(self.rounds) for column in self.columns]


@dataclass
class Round:
    """One stream whose provider was killed or stopped after `kill_at` chunks."""

    column: str
    victim: str = ""
    error: str | None = None
    # Seconds: the buyer's longest silence after the kill, the kill to the first token after it,
    # and the kill to the gateway logging that another provider accepted the continuation.
    stall_s: float | None = None
    kill_to_next_s: float | None = None
    kill_to_accepted_s: float | None = None
    # Ordinary gaps between content chunks of this stream, outside the failover window.
    normal_gaps_s: list[float] = field(default_factory=list)
    # From the restart (or SIGCONT) until every gateway's pool holds the victim again.
    rejoin_s: float | None = None
    failover_reasons: list[str] = field(default_factory=list)
    killed_after_chunks: int = 0


def _seconds(raw: str) -> float:
    value = float(raw)
    if not 0.05 <= value <= 10:
        raise argparse.ArgumentTypeError(f"between 0.05 and 10 seconds, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__, "failover")
    parser.add_argument(
        "--kills",
        type=cli.positive,
        default=None,
        help=f"rounds per column (default {DEFAULT_ROUNDS}; {QUICK_ROUNDS} with --quick)",
    )
    parser.add_argument(
        "--only",
        choices=(KILL, SLEEP),
        default=None,
        help="one column only: kill (SIGKILL the daemon) or sleep (SIGSTOP the daemon and its worker)",
    )
    parser.add_argument(
        "--sleep", action="store_true", help="the SIGSTOP column only ('Mac asleep'); same as --only sleep"
    )
    parser.add_argument(
        "--tokens",
        type=cli.positive,
        default=DEFAULT_TOKENS,
        help=f"max_tokens of every stream (default {DEFAULT_TOKENS})",
    )
    parser.add_argument(
        "--kill-at",
        type=cli.positive,
        default=DEFAULT_KILL_AT,
        help=f"content chunks received before the kill (default {DEFAULT_KILL_AT})",
    )
    parser.add_argument(
        "--daemons",
        type=int,
        default=DEFAULT_DAEMONS,
        help=f"daemons serving the model, 2 or more (default {DEFAULT_DAEMONS})",
    )
    parser.add_argument(
        "--heartbeat",
        type=_seconds,
        default=HEARTBEAT_S,
        help=f"the daemons' MP_HEARTBEAT_S (default {HEARTBEAT_S})",
    )
    cli.add_run_flags(parser, quick=f"smoke run: {QUICK_ROUNDS} rounds per column", strict="exit 1 if any round failed")
    return parser


def make_plan(argv: list[str]) -> tuple[FailoverPlan, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.daemons < 2:
        parser.error("--daemons: at least 2 (one to kill, one to continue)")
    if args.sleep and args.only == KILL:
        parser.error("--sleep and --only kill contradict each other")
    only = SLEEP if args.sleep else args.only
    if args.kill_at >= args.tokens:
        parser.error("--kill-at must be well below --tokens (the stream must still be running)")
    plan = FailoverPlan(
        columns=(only,) if only else (KILL, SLEEP),
        rounds=args.kills or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS),
        tokens=args.tokens,
        kill_at=args.kill_at,
        daemons=args.daemons,
        heartbeat_s=args.heartbeat,
    )
    return plan, args


class _Killer:
    """Finds the daemon running the stream (at its first chunk) and signals it once `kill_at` chunks arrived."""

    def __init__(self, stack: PoolStack, column: str, kill_at: int) -> None:
        self.stack = stack
        self.column = column
        self.kill_at = kill_at
        self.lookup: asyncio.Task[tuple[str, DaemonChild] | None] | None = None
        # (provider id, its daemon) once signalled.
        self.victim: tuple[str, DaemonChild] | None = None
        self.killed_perf: float | None = None
        self.killed_wall: float | None = None
        self.killed_after_chunks = 0

    def start(self) -> None:
        """Look for the victim from now on, concurrently, so that the stream keeps being read (and timed)."""
        self.lookup = asyncio.get_running_loop().create_task(self._find_busy())

    def on_chunk(self, chunks: int, now: float) -> None:
        if self.killed_perf is not None or chunks < self.kill_at or self.lookup is None or not self.lookup.done():
            return
        victim = self.lookup.result()
        if victim is None:
            return
        daemon = victim[1]
        if self.column == KILL:
            # The daemon process alone, as a crash would; its worker exits when its stdin closes.
            os.kill(daemon.proc.pid, signal.SIGKILL)
        else:
            # A sleeping Mac stops everything: the daemon and its worker (their process group).
            PoolStack.signal_group(daemon, signal.SIGSTOP)
        self.killed_perf = time.perf_counter()
        self.killed_wall = time.time()
        self.killed_after_chunks = chunks
        self.victim = victim

    async def _find_busy(self) -> tuple[str, DaemonChild] | None:
        """The one daemon with a request in flight (the benchmark runs one at a time)."""
        deadline = time.monotonic() + 10
        async with httpx.AsyncClient() as client:

            async def busy(daemon: DaemonChild) -> bool:
                try:
                    return await self.stack.in_flight(client, daemon) > 0
                except (httpx.HTTPError, ValueError, KeyError):
                    return False

            while time.monotonic() < deadline:
                daemons = list(self.stack.daemons.items())
                flags = await asyncio.gather(*(busy(daemon) for _, daemon in daemons))
                found = [item for item, flag in zip(daemons, flags, strict=True) if flag]
                if len(found) == 1:
                    return found[0]
                await asyncio.sleep(0.01)
        return None


def _analyse(result: Streamed, killer: _Killer, out: Round) -> None:
    """The stall, the kill-to-next-token time and the ordinary gaps of one killed stream."""
    times = result.chunk_times
    killed = killer.killed_perf
    assert killed is not None
    gaps = [(i, times[i] - times[i - 1]) for i in range(1, len(times))]
    after = [(i, gap) for i, gap in gaps if times[i] > killed]
    if not after:
        out.error = out.error or "no_token_after_kill"
        return
    # Chunks already on their way when the victim died still arrive; the resumption ends the longest silence.
    resume, stall = max(after, key=lambda item: item[1])
    out.stall_s = stall
    out.kill_to_next_s = times[resume] - killed
    # The failover window: from the kill to the first token after the stall.
    out.normal_gaps_s = [gap for i, gap in gaps if times[i] <= killed or i > resume]


def _failover_events(stack: PoolStack, request_id: str) -> list[dict[str, str]]:
    log_path = stack.gateways[GATEWAY].child.log_path
    return [e for e in logs.events(log_path, "failover") if e.get("request_id") == request_id]


async def _stream(
    stack: PoolStack, client: httpx.AsyncClient, plan: FailoverPlan, on_chunk: OnChunk | None = None
) -> Streamed:
    """The round's one request: the same prompt every time, via the gateway."""
    url = f"{stack.gateways[GATEWAY].base_url}/v1/chat/completions"
    body = chat_body(PROMPT, plan.tokens, model=MODEL_ID)
    return await stream_chat(client, url, stack.auth, body, plan.tokens, on_chunk=on_chunk)


async def _one_round(
    stack: PoolStack, client: httpx.AsyncClient, plan: FailoverPlan, column: str, reference: str
) -> Round:
    out = Round(column)
    killer = _Killer(stack, column, plan.kill_at)
    # Until the request is accepted no daemon is busy: the lookup keeps polling.
    killer.start()
    try:
        result = await _stream(stack, client, plan, on_chunk=killer.on_chunk)
    finally:
        if killer.lookup is not None and not killer.lookup.done():
            killer.lookup.cancel()
    victim = killer.victim
    out.victim = victim[0] if victim is not None else ""
    out.killed_after_chunks = killer.killed_after_chunks
    out.error = result.error
    if out.error is None and result.text != reference:
        out.error = "text_differs_from_unbroken_answer"
    if victim is None:
        # Nothing was signalled, so there is nothing to bring back.
        if len(result.chunk_times) < plan.kill_at:
            out.error = out.error or "stream_ended_before_the_kill"
        else:
            out.error = out.error or "no_busy_daemon_found"
        return out
    _analyse(result, killer, out)
    events = _failover_events(stack, result.request_id)
    out.failover_reasons = [e.get("reason", "?") for e in events]
    if events and killer.killed_wall is not None:
        out.kill_to_accepted_s = logs.timestamp(events[0]) - killer.killed_wall
    if not events:
        out.error = out.error or "no_failover_logged"

    # Bring the victim back: restart it (same provider id) or wake it, and wait until every pool shows it.
    provider_id, daemon = victim
    if column == KILL:
        daemon.stop()  # reaps it and sweeps its process group (its worker, if still there)
        back = time.monotonic()
        stack.spawn_daemon(provider_id)
    else:
        back = time.monotonic()
        PoolStack.signal_group(daemon, signal.SIGCONT)
    out.rejoin_s = await stack.wait_pool(within_s=120) - back
    return out


async def measure(plan: FailoverPlan, stack: PoolStack) -> dict[str, list[Round]]:
    results: dict[str, list[Round]] = {column: [] for column in plan.columns}
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=10.0)) as client:
        # The answer as one provider gives it, unbroken (temperature 0): every failover must reproduce it.
        unbroken = await _stream(stack, client, plan)
        if unbroken.error is not None:
            raise RuntimeError(f"the unbroken reference stream failed: {unbroken.error}")
        schedule = plan.schedule()
        for index, column in enumerate(schedule, 1):
            r = await _one_round(stack, client, plan, column, unbroken.text)
            results[column].append(r)
            say(
                f"round {index:>2}/{len(schedule)} {column:<5} victim {r.victim or '-':<14} "
                f"(after chunk {r.killed_after_chunks}): stall {_ms(r.stall_s)}, "
                f"kill->accepted {_ms(r.kill_to_accepted_s)}, "
                f"back in pool after {_s(r.rejoin_s)}: {r.error or 'ok'}"
            )
            stack.check_alive()
    return results


def _column(label: str, rounds: list[Round]) -> FailoverColumn:
    ok = [r for r in rounds if r.error is None]
    return FailoverColumn(
        label=label,
        rounds=len(rounds),
        errors=Counter(r.error for r in rounds if r.error is not None),
        # Timings of the rounds that came through intact only.
        stall_s=[r.stall_s for r in ok if r.stall_s is not None],
        kill_to_next_s=[r.kill_to_next_s for r in ok if r.kill_to_next_s is not None],
        kill_to_accepted_s=[r.kill_to_accepted_s for r in ok if r.kill_to_accepted_s is not None],
        accepted_to_next_s=[
            r.kill_to_next_s - r.kill_to_accepted_s
            for r in ok
            if r.kill_to_next_s is not None and r.kill_to_accepted_s is not None
        ],
        normal_gaps_s=[gap for r in ok for gap in r.normal_gaps_s],
        rejoin_s=[r.rejoin_s for r in rounds if r.rejoin_s is not None],
        killed_after_chunks=[r.killed_after_chunks for r in rounds if r.victim],
        failovers_per_stream=Counter(len(r.failover_reasons) for r in rounds if r.victim),
        reasons=Counter(reason for r in rounds for reason in r.failover_reasons),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _detection(hb: float) -> str:
    """The possible detection times: the first re-check tick after (L-1)*hb .. L*hb seconds."""
    first = math.floor((LOST_AFTER_INTERVALS - 1) * hb / DISPATCH_TICK_S + 1e-9) + 1
    last = math.ceil(LOST_AFTER_INTERVALS * hb / DISPATCH_TICK_S - 1e-9)
    times = [k * DISPATCH_TICK_S for k in range(first, max(first, last) + 1)]
    if len(times) <= 2:
        return " or ".join(f"{t:g}" for t in times)
    return f"{times[0]:g}-{times[-1]:g} (in {DISPATCH_TICK_S:g} s steps)"


def header(plan: FailoverPlan) -> list[str]:
    hb = plan.heartbeat_s
    detect = LOST_AFTER_INTERVALS * hb
    return [
        f"mac-provider failover benchmark: the buyer's wait when a provider dies mid-answer "
        f"({time.strftime('%Y-%m-%d %H:%M:%S %Z')})",
        "",
        f"MODEL: the tiny real mlx-lm model of the tests (tests/support/tiny_model.py, seed {MODEL_SEED}: a 2-layer",
        "       llama with random weights that never emits EOS), so every stream runs to max_tokens. Real inference,",
        "       but tiny: the continuation's prefill is cheap here; a real model adds its own prefill time.",
        f"pool: one nats-server, one PostgreSQL, one control plane, {plan.daemons} provider daemons serving the same",
        f"      model id, each with MP_HEARTBEAT_S={hb:g}.",
        f"detection: the gateway re-checks a waiting request's provider every {DISPATCH_TICK_S:g} s and declares",
        f"      it lost when its heartbeats stopped for MP_LOST_AFTER_INTERVALS={LOST_AFTER_INTERVALS} intervals "
        f"({detect:g} s; services/gateway/dispatch.py",
        "      Call._next), then re-dispatches to another provider with the prompt plus the tokens so far",
        f"      (bus.Continuation). The pool drops a provider after MP_HEARTBEAT_MISSES={HEARTBEAT_MISSES} intervals "
        f"({HEARTBEAT_MISSES * hb:g} s).",
        f"      The last heartbeat before a kill went out 0-{hb:g} s earlier, so the provider counts as lost "
        f"{detect - hb:g}-{detect:g} s",
        "      after it; the gateway notices at its next re-check, which ticks from the last frame it received (just",
        f"      before the kill): detection takes {_detection(hb)} s when nothing lags, "
        f"{detect - hb:g}-{detect + DISPATCH_TICK_S:g} s otherwise.",
        f"each round: one streamed chat completion, temperature 0, max_tokens={plan.tokens}, the same prompt;",
        f"      once {plan.kill_at} content chunks arrived, the daemon running it (/admin/status in_flight > 0) is",
        "  process killed = SIGKILL to the daemon process (its worker exits when its stdin closes); then the daemon",
        "                  is started again under the same provider id",
        "  Mac asleep     = SIGSTOP to the daemon and its worker (their process group); then SIGCONT: it wakes,",
        "                  cancels the request it lost, and rejoins",
        "      and the next round starts once every pool holds all daemons again, none busy, each warmed by one",
        f"      local request. {plan.rounds} rounds per column, the columns alternating round by round.",
        "      A round fails unless its stream ends with [DONE], no in-band error, finish_reason=length,",
        "      usage.completion_tokens == max_tokens and exactly the text of one unbroken answer (taken first).",
        *machine_lines("the client, control plane, nats-server, daemons and PostgreSQL"),
    ]


FOOTER = [
    "kill -> next token: from sending the signal to the first content chunk from the provider that continued (the",
    "chunk that ends the longest silence after the signal). buyer's stall: that silence, from the last chunk read",
    "before it (one the dead provider still had on its way counts as before) to that chunk; the signal goes out as",
    "a chunk is read, so the two differ only by such late chunks. kill -> continuation accepted: to the gateway's",
    "'failover' log line, written once another provider accepted the continuation (log clock vs the benchmark's",
    "wall clock); accepted -> next token: the rest (the new provider re-reads the prompt plus the tokens so far",
    "and decodes the next one). signalled after content chunk: the victim is looked up (/admin/status, polled from",
    "the request's start) concurrently with reading the stream; a slow lookup signals later than planned. Timings",
    "are of the successful rounds. normal gap: between consecutive content chunks of the same streams outside the",
    "failover window (from the signal to the first chunk after the stall); chunks read in one socket read share a",
    "timestamp, so many gaps are 0. p50/p99: nearest rank (below 100 rounds, p99 is the slowest one). back in the",
    "pool: from starting the killed daemon again (or SIGCONT) until every gateway's pool lists it.",
]


def _stack(plan: FailoverPlan, home: Path) -> PoolStack:
    env = {
        **RAISED_QUOTAS,
        "MP_LOST_AFTER_INTERVALS": str(LOST_AFTER_INTERVALS),
        "MP_HEARTBEAT_MISSES": str(HEARTBEAT_MISSES),
    }
    daemons = [
        DaemonSpec(f"fo-{chr(ord('a') + i)}", {"MP_HEARTBEAT_S": f"{plan.heartbeat_s:g}"}) for i in range(plan.daemons)
    ]
    return PoolStack(home, gateways=[GatewaySpec(GATEWAY, env)], daemons=daemons)


async def _columns(plan: FailoverPlan, stack: PoolStack) -> list[FailoverColumn]:
    results = await measure(plan, stack)
    return [_column(LABELS[c], results[c]) for c in plan.columns]


def _verdict(columns: list[FailoverColumn]) -> Verdict:
    hollow = all(col.failed == col.rounds for col in columns)
    return Verdict(
        failed=any(col.failed for col in columns),
        hollow="no round succeeded" if hollow else None,
        unit="rounds",
        keep_failed_logs=True,
    )


def run(plan: FailoverPlan, *, keep_logs: bool, strict: bool) -> int:
    return harness.run(
        prefix="mp-bench-failover-",
        stack=lambda home: _stack(plan, home),
        measure=lambda stack: _columns(plan, stack),
        verdict=_verdict,
        table=lambda columns, tail: render_failover(header=header(plan), columns=columns, footer=[*FOOTER, *tail]),
        keep_logs=keep_logs,
        strict=strict,
        load_line=True,
    )


def main(argv: list[str]) -> int:
    plan, args = make_plan(argv)
    return run(plan, keep_logs=args.keep, strict=args.strict)
