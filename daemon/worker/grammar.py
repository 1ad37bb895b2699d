"""Constrained decoding in the worker: llguidance masks every token that would break a grammar.

The daemon compiles a request's response_format into an llguidance grammar
and refuses it there if it does not compile; here each constrained sequence
gets its own matcher, run as the last logits processor of its row in the
batch. llguidance walks the tokenizer's token trie on the fly (no index
precomputed per schema), in a fraction of a millisecond a token, while the
model computes the step's logits, so a constrained request costs its
unconstrained neighbours little.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np
import structlog

log = structlog.get_logger("daemon.worker")


class GrammarError(Exception):
    """A grammar the matcher refused, or output that no longer fits it."""


def grammar_tokenizer(tokenizer: Any, vocab_size: int) -> Any | None:
    """llguidance's view of the model's tokenizer (about a second: build it once per model).

    None when llguidance is missing or cannot read this tokenizer (it needs a
    fast Hugging Face tokenizer): the worker then reports that it cannot
    constrain, and the daemon refuses response_format instead of ignoring it.
    """
    try:
        import llguidance.hf
    except ImportError as exc:
        log.warning("structured_output_unavailable", reason=f"llguidance cannot be imported: {exc}")
        return None
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        # The model's logits can be wider than the tokenizer: the extra ids are never allowed.
        return llguidance.hf.from_tokenizer(
            hf, n_vocab=max(vocab_size, len(hf)), eos_token=sorted(tokenizer.eos_token_ids)
        )
    except Exception as exc:
        log.warning("structured_output_unavailable", reason=f"{type(exc).__name__}: {exc}")
        return None


class Constraint:
    """One sequence's grammar as an mlx-lm logits processor: (tokens so far, logits) -> masked logits.

    mlx-lm calls it once per decode step with the sequence's whole context,
    whose last token is the one sampled at the previous step (the last prompt
    token at the first step). The matcher consumes each new token, then the
    mask of what may follow sends every other logit to -inf; once the grammar
    is complete only EOS remains, so the sequence ends with finish "stop"
    instead of running on to max_tokens.
    """

    def __init__(self, tokenizer: Any, grammar: str, prefix: list[int]) -> None:
        import llguidance
        from llguidance.numpy import allocate_token_bitmask

        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        # A failover continuation: output earlier providers generated under the same grammar.
        if prefix and not self._matcher.consume_tokens(prefix):
            raise GrammarError(f"the output so far does not fit response_format: {self._matcher.get_error()}")
        if self._matcher.is_error():
            raise GrammarError(f"response_format cannot be constrained: {self._matcher.get_error()}")
        self._bitmask = allocate_token_bitmask(1, tokenizer.vocab_size)
        self._seen: int | None = None

    @property
    def error(self) -> str:
        """Why the output stopped fitting the grammar ("" while it fits): llguidance's first line,
        not the parser state dump that follows it (schema internals, no use to a buyer)."""
        return self._matcher.get_error().split("\n", 1)[0][:300] if self._matcher.is_error() else ""

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        from llguidance.numpy import fill_next_token_bitmask

        n = tokens.shape[0]
        # The mask needs the previous token, not this step's logits: queue the context's update,
        # then the forward pass, and compute the mask on this thread while the model runs (so
        # the batch keeps mlx-lm's overlap of compute and Python). The context is read through
        # its buffer: a new op (a slice) would queue behind the forward pass and wait for it.
        mx.async_eval(tokens)
        mx.async_eval(logits)
        if self._seen is None:
            self._seen = n  # the prompt: nothing generated yet
        elif n > self._seen:
            new = np.asarray(memoryview(tokens))[self._seen :].tolist()  # type: ignore[arg-type]
            self._seen = n
            # A complete grammar has nothing left to consume but EOS (sampled into the batch's
            # look-ahead step after the sequence ended); feeding it again would be an error.
            if not self._matcher.is_stopped():
                self._matcher.consume_tokens(new)
        fill_next_token_bitmask(self._matcher, self._bitmask)
        # One bit per token, at least as many as the logits (grammar_tokenizer sized it so).
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: logits.shape[-1]]
        return mx.where(mx.array(allowed.astype(np.bool_)), logits, -math.inf)
