"""Where a streamed request's time to first token went, from the client's samples and the gateway's summary lines.

The gateway logs, per request, the time from its arrival to its dispatch (`dispatch_ms`: auth,
body, quota), from there to a provider's acceptance (`accept_ms`: NATS both ways and the
daemon's admission), and to the first token it took (`ttft_ms`). The client saw the whole.
What the client saw beyond the gateway's `ttft_ms` is HTTP both ways: the request reaching the
gateway's handler and the first chunk reaching the client.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.bench.load import Sample
from tests.support import logs

# The parts, in the order they happen (p50 of each, in ms).
PARTS = ("dispatch", "accept", "first token", "HTTP")


def _events(log_path: Path, event: str) -> list[dict[str, Any]]:
    """The log's `event` lines: JSON (MP_LOG_FORMAT=json, as the benchmarks run gateways) or the console's."""
    found = []
    with log_path.open("rb") as f:
        for raw in f:
            if raw.startswith(b"{"):
                with contextlib.suppress(ValueError):
                    line = json.loads(raw)
                    if isinstance(line, dict) and line.get("event") == event:
                        found.append(line)
    return found or list(logs.events(log_path, event))


def frames_by_request(log_path: Path, event: str = "chat_completion") -> dict[str, int]:
    """Each request's Delta frames as its gateway received them (the summary line's `frames`), by request id."""
    found: dict[str, int] = {}
    for line in _events(log_path, event):
        rid, frames = line.get("request_id"), line.get("frames")
        if isinstance(rid, str) and isinstance(frames, int):
            found[rid] = frames
    return found


def frames_per_request(samples: Sequence[Sample], frames: dict[str, int]) -> float | None:
    """The mean frames of the samples that succeeded and whose summary line is known (None: none is)."""
    known = [frames[s.request_id] for s in samples if s.ok and s.request_id in frames]
    return statistics.mean(known) if known else None


def timeline(samples: Sequence[Sample], log_path: Path, event: str = "chat_completion") -> dict[str, float] | None:
    """The p50 of each part over the samples the gateway's log has a summary line for (None: none)."""
    lines = {line.get("request_id"): line for line in _events(log_path, event)}
    parts: dict[str, list[float]] = {part: [] for part in PARTS}
    for sample in samples:
        line = lines.get(sample.request_id)
        if line is None or sample.ttft_s is None or not sample.ok:
            continue
        try:
            dispatch, accept, ttft = (float(line[k]) for k in ("dispatch_ms", "accept_ms", "ttft_ms"))
        except (KeyError, ValueError):
            continue  # a gateway that does not log them
        values = (dispatch, accept, ttft - dispatch - accept, sample.ttft_s * 1000 - ttft)
        for part, value in zip(PARTS, values, strict=True):
            parts[part].append(value)
    if not parts["dispatch"]:
        return None
    return {part: statistics.median(values) for part, values in parts.items()}
