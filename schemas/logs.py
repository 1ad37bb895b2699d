"""structlog set-up for the control plane and the daemon alike: one line per event to stderr.

JSON in the cloud, readable locally (brew services collects the daemon's stderr into its log file).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

_ENCODER = msgspec.json.Encoder(enc_hook=repr)


# msgspec: a summary line per request, rendered in 0.8 us rather than json.dumps' 3.4 (`repr` for
# what JSON has no type for, as structlog's own fallback).
def _to_json(event: object, **_: object) -> bytes:
    return _ENCODER.encode(event)


def configure(*, json: bool, level: str = "info") -> None:
    # JSON lines are written as msgspec makes them (bytes): no decode, no print(). A stderr with no
    # binary buffer underneath (replaced by a test harness) gets them as text.
    raw = getattr(sys.stderr, "buffer", None)
    logger_factory: Callable[..., Any]
    if json and raw is not None:
        renderer: structlog.typing.Processor = structlog.processors.JSONRenderer(serializer=_to_json)
        logger_factory = structlog.BytesLoggerFactory(raw)
    else:
        renderer = (
            structlog.processors.JSONRenderer(serializer=lambda e, **_: _to_json(e).decode())
            if json
            else structlog.dev.ConsoleRenderer(colors=False)
        )
        # One write per line (print() writes the newline apart: two system calls on an unbuffered stderr).
        logger_factory = structlog.WriteLoggerFactory(sys.stderr)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
