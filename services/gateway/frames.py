"""Frames that reached the gateway together leave it as one streamed event.

When the gateway falls behind (a busy replica, a provider that sent several
frames at once), a stream's reply queue holds more than one delta. Each was
vetted and metered on its own; rendering them as one chunk spares the per-chunk
work (encoding, one ASGI message, one socket write) for every frame but the
first. Nothing waits for more: only frames already queued join, so a quiet
stream is unchanged and a token is never held back.
"""

from __future__ import annotations

from schemas import bus

# A bound on what one chunk carries (the queue of one stream is bounded by its max_tokens anyway).
MAX_JOINED = 64


def joins(run: list[bus.Delta], then: bus.Delta) -> bool:
    """Whether `then` can join `run` without reordering what the buyer sees.

    A chunk renders reasoning, then text, then tool calls: so nothing follows tool calls, and
    reasoning never follows text.
    """
    last = run[-1]
    return len(run) < MAX_JOINED and not last.tool_calls and not (then.reasoning and any(d.text for d in run))


def joined(run: list[bus.Delta]) -> bus.Delta:
    if len(run) == 1:
        return run[0]
    return bus.Delta(
        seq=run[-1].seq,
        text="".join(d.text for d in run),
        tokens=sum(d.tokens for d in run),
        tool_calls=[c for d in run for c in d.tool_calls],
        logprobs=[lp for d in run for lp in d.logprobs],
        token_ids=[i for d in run for i in d.token_ids],
        reasoning="".join(d.reasoning for d in run),
    )
