"""Does a canary answer come from the same weights as the reference? The tolerance, written down.

Both answers are greedy, so with the same weights they pick the same token at every step
unless two tokens are so close that different hardware (Metal against CPU, another BLAS,
another batch shape) rounds them the other way. The rule, token by token from the first:

- the same token: its log-probabilities must agree within LOGPROB_TOLERANCE nats (the same
  weights give the same distribution up to rounding, a few hundredths of a nat; other
  weights of the same shape miss by far more);
- a different token: fine only if the reference's token led its runner-up by at most
  NEAR_TIE nats (a tie rounding may break either way). The answers then continue from
  different texts, so the comparison stops there; otherwise the canary failed;
- an answer that ends (end of sequence) where the reference goes on counts as a different
  token at that step.

A comparison that stops at a near tie before MIN_COMPARED tokens agreed is inconclusive
(it neither passes nor fails). Without log-probabilities (an engine that reports none)
only the tokens are compared, and any difference fails.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas import bus

LOGPROB_TOLERANCE = 0.3
NEAR_TIE = 0.3
MIN_COMPARED = 4


@dataclass(frozen=True, slots=True)
class Answer:
    """A canary's answer: the token ids, and per token its log-probability and lead over the runner-up."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float | None, ...]
    margins: tuple[float | None, ...]
    finish_reason: str


@dataclass(frozen=True, slots=True)
class Comparison:
    # "passed", "failed" or "inconclusive"
    result: str
    compared: int
    detail: str = ""


def margin(item: bus.TokenLogprob) -> float | None:
    """How far the chosen token led the best other token (None: no alternative reported)."""
    # Tokens are told apart by their bytes (two tokens that are parts of characters show the same text).
    chosen = item.bytes if item.bytes is not None else item.token
    others = [lp for text, lp, raw in item.top if (raw if raw is not None else text) != chosen]
    if not others:
        return None
    return item.logprob - max(others)


def compare(answer: Answer, reference: Answer) -> Comparison:
    got, want = answer.token_ids, reference.token_ids
    agreed = 0
    for i in range(min(len(got), len(want))):
        if got[i] == want[i]:
            mine, theirs = _at(answer.logprobs, i), _at(reference.logprobs, i)
            if mine is not None and theirs is not None and abs(mine - theirs) > LOGPROB_TOLERANCE:
                return Comparison(
                    "failed",
                    agreed,
                    f"token {i}: log-probability {mine:.3f} where the reference has {theirs:.3f} "
                    f"(tolerance {LOGPROB_TOLERANCE})",
                )
            agreed += 1
            continue
        return _diverged(i, agreed, f"token {i} is {got[i]} where the reference has {want[i]}", reference)
    if len(got) < len(want) and answer.finish_reason == "stop":
        ended = f"the answer ended after {len(got)} tokens; the reference goes on"
        return _diverged(len(got), agreed, ended, reference)
    if len(got) != len(want) and not (len(got) > len(want) and reference.finish_reason == "stop"):
        return Comparison("failed", agreed, f"{len(got)} tokens where the reference has {len(want)}")
    # Same tokens throughout (past the reference's own end of sequence nothing is known).
    return Comparison("passed" if agreed >= MIN_COMPARED else "inconclusive", agreed)


def _diverged(i: int, agreed: int, what: str, reference: Answer) -> Comparison:
    lead = _at(reference.margins, i)
    if lead is not None and lead <= NEAR_TIE:
        result = "passed" if agreed >= MIN_COMPARED else "inconclusive"
        return Comparison(result, agreed, f"{what}, at a near tie (lead {lead:.3f} nats)")
    lead_text = f" (its lead: {lead:.3f} nats)" if lead is not None else ""
    return Comparison("failed", agreed, f"{what}{lead_text}")


def _at(values: tuple[float | None, ...], i: int) -> float | None:
    return values[i] if i < len(values) else None
