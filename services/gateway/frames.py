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
    # One pass over the run (six, one per field, were a visible share of a busy stream's cost per frame).
    texts: list[str] = []
    reasoning: list[str] = []
    tool_calls: list[bus.ToolCall] = []
    logprobs: list[bus.TokenLogprob] = []
    token_ids: list[int] = []
    tokens = 0
    for d in run:
        texts.append(d.text)
        token_ids += d.token_ids
        tokens += d.tokens
        if d.reasoning:
            reasoning.append(d.reasoning)
        if d.tool_calls:
            tool_calls += d.tool_calls
        if d.logprobs:
            logprobs += d.logprobs
    return bus.Delta(
        seq=run[-1].seq,
        text="".join(texts),
        tokens=tokens,
        tool_calls=tool_calls,
        logprobs=logprobs,
        token_ids=token_ids,
        reasoning="".join(reasoning),
    )
