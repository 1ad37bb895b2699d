"""`python3 -m tests.bench versus --base REV` (`just bench versus --base REV`): this tree's gateway against
the gateway of another commit, in one run.

One stack (nats-server, PostgreSQL, one synthetic daemon: this tree's) and two metering-on control planes:
`base` runs the code of REV (a temporary git worktree), `this` the working tree. The same requests go to
each in alternating rounds (base first in even rounds, this first in odd ones), and each round's gateway
CPU per request is paired with the other's in the same round. On a shared machine whose speed drifts by a
third within an hour, that pairing is what tells a change of a few percent from the drift: the table
prints the mean of the rounds' differences and its standard error beside the two totals.

`--base HEAD` with a clean tree measures two identical gateways: the noise floor of the comparison.
REV must share this tree's database (its migrations a prefix of these: the base starts first).

With `--instructions`, both gateways run under valgrind's callgrind and the table gives the instructions
each executed per request (tests/bench/instructions.py): a count the machine's drift does not move, so a
change of a percent shows at c=1 in two rounds of a few hundred requests (its rounds agree within 0.5%).
The concurrent columns' rounds spread by a few percent (how much a loop turn batches follows the timing):
there a change needs more rounds, or c=1 to show it. Seconds, requests/s and time to first token mean
nothing then (a counting gateway runs about 50 times slower) and are left out; the kernel's side of
system calls is not counted.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench import cli, harness, instructions
from tests.bench.cpu import CpuProbe, _on_cpu_s, syscalls
from tests.bench.harness import Verdict
from tests.bench.hotpath import GATEWAYS
from tests.bench.lean_http import LeanClients
from tests.bench.load import Level, ViaGateway, drive, warmup
from tests.bench.progress import say
from tests.bench.stack import GatewaySpec
from tests.bench.synthetic import MODEL_ID, SyntheticStack
from tests.support.stack import REPO

SIDES = ("base", "this")
# (label, streamed, concurrency)
COLUMNS = {
    "nonstream16": ("non-stream c=16", False, 16),
    "stream64": ("stream c=64", True, 64),
    "stream1": ("stream c=1", True, 1),
    # Steadier than c=16 under --instructions (nothing batches across requests): a change of a percent shows.
    "nonstream1": ("non-stream c=1", False, 1),
}


@dataclass
class Side:
    cpu_ms: list[float] = field(default_factory=list)  # per round: gateway CPU ms per request
    # Per round: the gateway's read and write system calls per request (None where /proc cannot say).
    calls: list[float | None] = field(default_factory=list)
    levels: list[Level] = field(default_factory=list)
    # Per round: instructions per request (with --instructions).
    instructions: list[float] = field(default_factory=list)
    # Per round: the CPU ms per request of the shared nats-server and PostgreSQL (all its processes) while this
    # side's requests ran. Metering's work there (JetStream storing and delivering usage events, the ledger's
    # writes) is most of what it costs the machine; the other side sits idle meanwhile.
    servers_ms: list[float] = field(default_factory=list)


Measured = dict[str, dict[str, Side]]


@dataclass(frozen=True)
class Plan:
    base: str
    columns: tuple[str, ...]
    requests: int
    rounds: int
    tokens: int = 64
    # Count the gateways' instructions (both run under callgrind) instead of timing them.
    instructions: bool = False


def worktree(rev: str, into: Path) -> Path:
    """A detached worktree of `rev` under `into` (removed by `drop_worktree`)."""
    path = into / "base"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(path), rev],
        check=True,
        capture_output=True,
        text=True,
    )
    return path


def drop_worktree(path: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


async def measure(plan: Plan, stack: SyntheticStack) -> Measured:
    measured: Measured = {c: {s: Side() for s in SIDES} for c in plan.columns}
    assert stack.nats_pid is not None
    assert stack.postgres_pid is not None
    servers = (CpuProbe(stack.nats_pid), CpuProbe(stack.postgres_pid, tree=True))
    # The lean client (lean_http.py): httpx's own CPU, as much as the gateway's, took the cores from it.
    async with LeanClients() as clients:
        for column in plan.columns:
            _, streamed, conc = COLUMNS[column]
            for side in SIDES:
                gw = stack.gateways[side]
                send = ViaGateway(clients, gw.base_url, stack.api_key, MODEL_ID, plan.tokens, stream=streamed)
                await drive(send, concurrency=conc, requests=warmup(conc))
        for r in range(plan.rounds):
            for column in plan.columns:
                _, streamed, conc = COLUMNS[column]
                for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                    gw = stack.gateways[side]
                    send = ViaGateway(clients, gw.base_url, stack.api_key, MODEL_ID, plan.tokens, stream=streamed)
                    pid = gw.child.proc.pid
                    counting = instructions.Counting(pid) if plan.instructions else None
                    if counting is not None:
                        counting.start()
                    shared = [probe.snapshot() for probe in servers]
                    before, calls_before = _on_cpu_s(pid) or 0.0, syscalls(pid)
                    level = await drive(send, concurrency=conc, requests=plan.requests)
                    after, calls_after = _on_cpu_s(pid) or 0.0, syscalls(pid)
                    n = max(1, len(level.samples))
                    used = [CpuProbe.used(s0, probe.snapshot()) for s0, probe in zip(shared, servers, strict=True)]
                    measured[column][side].servers_ms.append(sum(u or 0.0 for u in used) / n * 1000)
                    if counting is not None:
                        measured[column][side].instructions.append(counting.stop() / n)
                    measured[column][side].cpu_ms.append((after - before) / n * 1000)
                    calls = None if calls_before is None or calls_after is None else (calls_after - calls_before) / n
                    measured[column][side].calls.append(calls)
                    measured[column][side].levels.append(level)
                    say(f"round {r + 1}: {COLUMNS[column][0]:<16} {side}: {len(level.samples)} requests")
    return measured


def _p50_ms(levels: list[Level], what: str) -> str:
    values = sorted(
        v for lv in levels for s in lv.samples if s.ok and (v := s.ttft_s if what == "ttft" else s.latency_s)
    )
    return f"{values[len(values) // 2] * 1000:.2f}" if values else "-"


def _calls(side: Side) -> str:
    known = [c for c in side.calls if c is not None]
    return f"{statistics.mean(known):.2f}" if known and len(known) == len(side.calls) else "-"


def render(plan: Plan, measured: Measured, tail: list[str]) -> str:
    if plan.instructions:
        return _render_instructions(plan, measured, tail)
    head = (
        f"{'column':<16} | {'gw CPU ms/req, base':>19} {'this':>7} | {'this - base, per round':>22} | "
        f"{'req/s base':>10} {'this':>6} | {'TTFT p50 ms base':>16} {'this':>6} | "
        f"{'latency p50 base':>16} {'this':>6} | {'syscalls/req base':>17} {'this':>6} | "
        f"{'NATS+PG ms/req base':>19} {'this':>6} | {'gw+NATS+PG, this - base':>23}"
    )
    lines = [f"gateway of {plan.base} (base) against this tree (this), metering on, {plan.rounds} rounds", head]
    lines.append("-" * len(head))
    for column in plan.columns:
        base, this = measured[column]["base"], measured[column]["this"]
        diffs = [t - b for b, t in zip(base.cpu_ms, this.cpu_ms, strict=True)]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        rate = [sum(len(lv.samples) for lv in s.levels) / sum(lv.wall_s for lv in s.levels) for s in (base, this)]
        whole = [
            (t + ts) - (b + bs)
            for b, t, bs, ts in zip(base.cpu_ms, this.cpu_ms, base.servers_ms, this.servers_ms, strict=True)
        ]
        whole_se = statistics.stdev(whole) / len(whole) ** 0.5 if len(whole) > 1 else float("nan")
        lines.append(
            f"{COLUMNS[column][0]:<16} | {statistics.mean(base.cpu_ms):19.3f} {statistics.mean(this.cpu_ms):7.3f} | "
            f"{statistics.mean(diffs):+12.3f} ± {se:.3f} ms | {rate[0]:10.0f} {rate[1]:6.0f} | "
            f"{_p50_ms(base.levels, 'ttft'):>16} {_p50_ms(this.levels, 'ttft'):>6} | "
            f"{_p50_ms(base.levels, 'latency'):>16} {_p50_ms(this.levels, 'latency'):>6} | "
            f"{_calls(base):>17} {_calls(this):>6} | "
            f"{statistics.mean(base.servers_ms):19.3f} {statistics.mean(this.servers_ms):6.3f} | "
            f"{statistics.mean(whole):+13.3f} ± {whole_se:.3f} ms"
        )
    lines += [
        "gw CPU: user+system CPU of that gateway process in a round / its requests; this - base: the mean of the",
        "rounds' paired differences ± its standard error (a difference within two of those is not one).",
        "NATS+PG: the shared nats-server's and PostgreSQL's CPU while that side's requests ran, per request (the",
        "usage stream's storing and delivering, the ledger's writes; a round also holds a little of the ledger's",
        "lag from the round before); gw+NATS+PG: the paired difference of the three together, what a change",
        "costs or saves the machine (metering on vs off in `just bench hotpath` follows it).",
        "syscalls/req: the gateway's read and write system calls per request (/proc/<pid>/io), which the",
        "machine's drift does not move: a change in them is the change's own.",
        *tail,
    ]
    return "\n".join(lines)


def _render_instructions(plan: Plan, measured: Measured, tail: list[str]) -> str:
    head = (
        f"{'column':<16} | {'instructions/req base':>21} {'this':>11} | {'this / base':>11} | "
        f"{'rounds, this / base':<24} | {'syscalls/req base':>17} {'this':>6}"
    )
    lines = [
        f"gateway of {plan.base} (base) against this tree (this), metering on, {plan.rounds} rounds, "
        "instructions counted by callgrind",
        head,
        "-" * len(head),
    ]
    for column in plan.columns:
        base, this = measured[column]["base"], measured[column]["this"]
        ratios = [t / b for b, t in zip(base.instructions, this.instructions, strict=True) if b]
        mean_b, mean_t = statistics.mean(base.instructions), statistics.mean(this.instructions)
        lines.append(
            f"{COLUMNS[column][0]:<16} | {mean_b:21,.0f} {mean_t:11,.0f} | {mean_t / mean_b:11.4f} | "
            f"{' '.join(f'{r:.4f}' for r in ratios):<24} | {_calls(base):>17} {_calls(this):>6}"
        )
    lines += [
        "instructions/req: what the gateway process executed in user space in a round / its requests (its",
        "event loop's idle turns included; not the kernel's work in its system calls: see syscalls/req),",
        "mean of the rounds. A round's ratio is steady within 0.5% at c=1; at c=16-64 rounds spread by a few",
        "percent, as how much a loop turn batches follows the timing (--base HEAD gives this tree's own spread).",
        "Seconds are not measured: a counting gateway runs about 50 times slower, so concurrent columns batch",
        "more per loop turn than at full speed.",
        *tail,
    ]
    return "\n".join(lines)


def _verdict(measured: Measured) -> Verdict:
    levels = [lv for col in measured.values() for side in col.values() for lv in side.levels]
    failed = any(not s.ok for lv in levels for s in lv.samples)
    hollow = any(not any(s.ok for s in lv.samples) for lv in levels)
    return Verdict(failed=failed, hollow="no request succeeded in some round" if hollow else None)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__, "versus")
    parser.add_argument("--base", required=True, help="the commit to compare against (any git revision)")
    parser.add_argument(
        "--columns",
        default="nonstream16,stream64,stream1",
        help=f"comma-separated, of {', '.join(COLUMNS)} (default: nonstream16,stream64,stream1)",
    )
    parser.add_argument("--requests", type=cli.positive, default=None, help="per round, column and side (1024)")
    parser.add_argument(
        "--rounds", type=cli.positive, default=None, help="rounds (default 10, 2 with --instructions or --quick)"
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count the gateways' instructions per request under callgrind (Debian's valgrind) instead of CPU time",
    )
    cli.add_run_flags(parser, quick="smoke run: fewer requests and rounds")
    args = parser.parse_args(argv)
    columns = tuple(c.strip() for c in args.columns.split(",") if c.strip())
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown or not columns:
        parser.error(f"unknown columns {unknown}; choose from {', '.join(COLUMNS)}")
    if args.instructions and instructions.missing():
        parser.error(f"--instructions needs {', '.join(instructions.missing())} (apt-get install valgrind)")
    plan = Plan(
        base=args.base,
        columns=columns,
        requests=args.requests or (128 if args.quick else 256 if args.instructions else 1024),
        rounds=args.rounds or (2 if args.quick or args.instructions else 10),
        instructions=args.instructions,
    )
    scratch = Path(tempfile.mkdtemp(prefix="mp-bench-versus-"))
    try:
        try:
            tree = worktree(plan.base, scratch)
        except subprocess.CalledProcessError as exc:
            print(f"[bench] cannot check out {plan.base!r}: {exc.stderr.strip()}", file=sys.stderr)
            return 2
        metered = dict(GATEWAYS[1].env)
        # Under callgrind a gateway starts several times slower (its counting is off until measured).
        wrapped = instructions.wrapper(scratch) if plan.instructions else ()
        start_s = 300.0 if plan.instructions else 60.0
        specs = [
            GatewaySpec("base", metered, cwd=tree, wrapper=wrapped, start_timeout_s=start_s),
            GatewaySpec("this", metered, wrapper=wrapped, start_timeout_s=start_s),
        ]
        return harness.run(
            prefix="mp-bench-",
            stack=lambda home: SyntheticStack(home, gateways=specs),
            measure=lambda stack: measure(plan, stack),
            verdict=_verdict,
            table=lambda measured, tail: render(plan, measured, tail),
            keep_logs=args.keep,
            strict=args.strict,
            load_line=True,
            fast_loop=True,
        )
    finally:
        if (scratch / "base").exists():
            drop_worktree(scratch / "base")
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
