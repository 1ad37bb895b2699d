"""Progress lines of every mode."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """Progress goes to stderr; stdout carries only the table."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)
