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
  scale     the local cluster (`just cluster`: 3 NATS nodes, PostgreSQL, 3 gateway replicas behind Caddy, 3
            synthetic daemons) under load (1 to 3 replicas beside LiteLLM's proxy and the bare engine), concurrent
            streams, faults (kill -9, SIGSTOP, restarts) with a ledger audit, and a soak
            (options: python3 -m tests.bench scale --help).

  hotpath   the gateway's hot path in one table: metering off, on with one key, on with one key per
            worker, streamed c=1 and c=64 and non-stream; gateway CPU per request; --profile adds py-spy's
            top functions (options: python3 -m tests.bench hotpath --help).

  versus    this tree's gateway against another commit's (--base REV, from a git worktree) on one stack,
            alternating rounds: gateway CPU per request with the mean of the rounds' paired differences
            and its standard error, req/s, TTFT and latency (options: python3 -m tests.bench versus --help).

  observability  the CPU that Prometheus metrics and OpenTelemetry traces add to one request, gateway
            and daemon, in process on the real objects, beside the same work with metrics off.
  settlement  the CPU that quotas and metering cost one request in the gateway's process (reserve,
            confirm, settle, the ledger writer), usage stream beside Postgres settlement, in process
            with real NATS and PostgreSQL (options: python3 -m tests.bench settlement --help).

Each prints one table and stops everything it started (also on Ctrl-C or error).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tests.bench import cli, metering, overhead

MODES = ("overhead", "metering")
# Modes with their own options and stacks: `python3 -m tests.bench <mode> --help`.
SEPARATE = (
    "hotpath",
    "daemon",
    "failover",
    "routing",
    "structured",
    "observability",
    "scale",
    "settlement",
    "versus",
)

DEFAULT_LEVELS = (1, 16, 64)
QUICK_LEVELS = (1, 16)

_levels = cli.positive_list(at_least=1, too_few="at least one concurrency level")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("mode", nargs="?", choices=MODES, default="overhead", help="what to measure (default overhead)")
    parser.add_argument("--tokens", type=cli.positive, default=64, help="max_tokens of every request (default 64)")
    parser.add_argument(
        "--requests",
        type=cli.positive,
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
    cli.add_run_flags(parser, quick="smoke run: concurrency 1 and 16, fewer requests")
    overhead_only = parser.add_argument_group("overhead mode only")
    overhead_only.add_argument(
        "--default-quotas",
        action="store_true",
        help="keep the product's default per-account quotas (concurrency 16 refuses part of the c=64 load)",
    )
    meter = parser.add_argument_group("metering mode only")
    meter.add_argument(
        "--rounds",
        type=cli.positive,
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


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, tuple[int, ...]]:
    """The arguments of the overhead and metering modes, and the concurrency levels they ask for."""
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
    return args, levels


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SEPARATE:
        # Imported only when asked for (the daemon mode's own imports are heavier).
        return importlib.import_module(f"tests.bench.{argv[0]}").main(argv[1:])
    args, levels = parse_args(argv)
    if args.mode == "metering":
        return metering.run(metering.make_plan(args, levels), keep_logs=args.keep, strict=args.strict)
    return overhead.run(overhead.make_plan(args, levels), keep_logs=args.keep, strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
