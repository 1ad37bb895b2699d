"""Command-line pieces the modes share: their parser, integer arguments, and the flags every run has."""

from __future__ import annotations

import argparse
from collections.abc import Callable

PROG = "python3 -m tests.bench"


def parser(doc: str | None, mode: str | None = None) -> argparse.ArgumentParser:
    """A mode's parser; its help shows the module docstring as written (line breaks kept)."""
    return argparse.ArgumentParser(
        prog=f"{PROG} {mode}" if mode else PROG,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_list(*, at_least: int, too_few: str) -> Callable[[str], tuple[int, ...]]:
    """An argument type: comma-separated positive integers, at least `at_least` of them (else `too_few`)."""

    def parse(raw: str) -> tuple[int, ...]:
        try:
            values = tuple(positive(part) for part in raw.split(",") if part.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {raw!r} ({exc})") from None
        if len(values) < at_least:
            raise argparse.ArgumentTypeError(too_few)
        return values

    return parse


def add_run_flags(
    parser: argparse.ArgumentParser, *, quick: str, strict: str = "exit 1 if any measured request failed"
) -> None:
    """--quick (a smoke run, `quick` says what), --keep and --strict: see harness.run."""
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs) after the run")
    parser.add_argument("--strict", action="store_true", help=strict)
