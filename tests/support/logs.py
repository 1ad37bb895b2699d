"""Reading the structlog console lines our processes write, for assertions on what they did."""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

_LINE = re.compile(r"^(?P<ts>\S+Z) \[(?P<level>\w+)\s*\] (?P<event>\S+)\s*(?P<rest>.*)$")
_FIELD = re.compile(r"(\w+)=('[^']*'|\"[^\"]*\"|\S+)")


def events(path: Path, name: str, *, since: int = 0) -> list[dict[str, str]]:
    """The `name` events in the log, from byte offset `since` on (a restarted process appends to its log)."""
    found = []
    with path.open("rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m.group("event") == name:
            fields = {k: v.strip("'\"") for k, v in _FIELD.findall(m.group("rest"))}
            fields["_ts"] = m.group("ts")
            found.append(fields)
    return found


def wait_event(path: Path, name: str, timeout: float = 10.0, **match: str) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        for event in events(path, name):
            if all(event.get(k) == v for k, v in match.items()):
                return event
        if time.monotonic() > deadline:
            raise AssertionError(f"no {name} {match} in {path} after {timeout}s")
        time.sleep(0.05)


def timestamp(event: dict[str, str]) -> float:
    return datetime.fromisoformat(event["_ts"].replace("Z", "+00:00")).timestamp()
