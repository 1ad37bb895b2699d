"""Turning a model's text steps into safe deltas.

Stop sequences are matched on decoded text, so one that spans several tokens
still fires; text that could be the start of a stop sequence is held back until
it is clear, so no part of a stop sequence is ever streamed.
"""

from __future__ import annotations


class StopFilter:
    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False
        # The stop string that matched (the earliest in the text; the first listed on a tie).
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Add generated text; returns what can be sent now (sets `stopped` on a match)."""
        if self.stopped:
            return ""
        buffer = self._held + text
        if not self._stops:
            self._held = ""
            return buffer
        hits = [(at, stop) for stop in self._stops if (at := buffer.find(stop)) >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            self.stopped = True
            self._held = ""
            return buffer[:at]
        keep = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of generation: held text that never became a stop sequence."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
