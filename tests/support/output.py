"""Feeding token ids to the daemon's output stage (daemon/engine/output.py) as the worker would."""

from __future__ import annotations

from daemon.engine.base import TextChunk
from daemon.engine.output import Output
from daemon.worker import protocol as p


def feed_until_stopped(output: Output, ids: list[int]) -> list[TextChunk]:
    """The chunks `output` gives for `ids`, one token at a time, until a stop string ends the answer."""
    chunks = []
    for token in ids:
        chunk = output.feed(p.Token(id="r", token=token))
        if chunk is not None:
            chunks.append(chunk)
        if output.stopped:
            break
    return chunks
