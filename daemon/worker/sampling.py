"""Per-request samplers and logits processors for the batch (runs in the worker).

mlx-lm's `make_sampler` draws from MLX's global random state, so a request's
`seed` would be disturbed by every other request in the batch (mlx_lm.server
refuses to batch seeded requests for that reason). Here a seeded request owns
its PRNG key and splits it once per token: the same seed gives the same text
whatever else is decoding alongside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
)

from daemon.worker.protocol import Generate

Sampler = Callable[[mx.array], mx.array]


def make_sampler(job: Generate, vocab_size: int) -> Sampler:
    """Greedy at temperature 0; otherwise the filters then a categorical draw."""
    if job.temperature <= 0:
        # One shared object: a batch of greedy requests samples in one call.
        return greedy_sampler
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0 < job.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, job.top_p))
    if job.min_p > 0:
        filters.append(lambda x: apply_min_p(x, job.min_p))
    if 0 < job.top_k < vocab_size:
        filters.append(lambda x: apply_top_k(x, job.top_k))
    inverse_temp = 1.0 / job.temperature
    key: list[Any] = [mx.random.key(job.seed) if job.seed is not None else None]

    def sample(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        if key[0] is None:
            return mx.random.categorical(logprobs * inverse_temp)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inverse_temp, key=sub)

    return sample


Processor = Callable[[mx.array, mx.array], mx.array]


def make_processors(job: Generate, constraint: Processor | None = None) -> list[Processor]:
    processors: list[Processor] = make_logits_processors(
        logit_bias=job.logit_bias or None,
        repetition_penalty=job.repetition_penalty,
        presence_penalty=job.presence_penalty,
        frequency_penalty=job.frequency_penalty,
    )
    if constraint is not None:
        # Last, so no bias or penalty can bring back a token the grammar forbids.
        processors.append(constraint)
    return processors
