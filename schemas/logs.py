"""structlog set-up for the control plane and the daemon alike: one line per event to stderr.

JSON in the cloud, readable locally (brew services collects the daemon's stderr into its log file).
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from structlog.typing import EventDict

_ENCODER = msgspec.json.Encoder(enc_hook=repr)


# msgspec: a summary line per request, rendered in 0.8 us rather than json.dumps' 3.4 (`repr` for
# what JSON has no type for, as structlog's own fallback).
def _to_json(event: object, **_: object) -> bytes:
    return _ENCODER.encode(event)


class UtcStamp:
    """structlog's `TimeStamper(fmt="iso", utc=True)`, its date and time of day formatted once a second:
    `datetime.now(utc).isoformat()` per line was 2.7 of the 12.5 us a request's summary line cost. Always
    six digits of microseconds (isoformat drops them when they are 0)."""

    __slots__ = ("_second",)

    def __init__(self) -> None:
        # (second, its date and time of day), replaced whole: a thread never sees one without the other.
        self._second: tuple[int, str] = (-1, "")

    def __call__(self, _logger: object, _name: str, event_dict: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        cached, prefix = self._second
        if second != cached:
            prefix = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (second, prefix)
        event_dict["timestamp"] = f"{prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event_dict


_FORMAT_EXC_INFO = structlog.processors.format_exc_info


def _exc_info(logger: Any, name: str, event_dict: EventDict) -> EventDict:
    # structlog's own looks for it and pops it on every line, as a call: 0.5 us a line without one.
    return _FORMAT_EXC_INFO(logger, name, event_dict) if "exc_info" in event_dict else event_dict


class SummaryLines:
    """Writes a request's summary line (one per request: the control plane's most frequent line).

    In JSON, the cloud's format, the line is encoded and written here, byte for byte as structlog writes it
    under `configure(json=True)`: the fields in order, then `event`, `level` and `timestamp`. structlog's
    per-call machinery (the bound logger, a copy of its context, the processor chain, its logger's own
    write) was 7 of the 11 us a line cost, about 4% of the gateway's instructions per non-stream request.
    The control plane binds no context variables, so none are merged. Elsewhere (the console format, a
    stderr with no binary buffer, a level above info) the line goes through structlog as any other.
    """

    __slots__ = ("_enabled", "_logger", "_raw", "_stamp")

    def __init__(self, logger_name: str, *, json: bool, level: str = "info") -> None:
        self._enabled = logging.getLevelName(level.upper()) <= logging.INFO
        raw = getattr(sys.stderr, "buffer", None)
        self._raw = raw if json else None
        self._stamp = UtcStamp()
        self._logger = structlog.get_logger(logger_name)

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        """Write `event`'s line with `fields` (the dict is the line's: it gains the event, level and time)."""
        if not self._enabled:
            return
        raw = self._raw
        if raw is None:
            self._logger.info(event, **fields)
            return
        fields["event"] = event
        fields["level"] = "info"
        self._stamp(None, "", fields)
        raw.write(_ENCODER.encode(fields) + b"\n")
        raw.flush()


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
            UtcStamp(),
            _exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
