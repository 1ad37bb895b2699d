"""Canary prompts, and the bus request each one becomes.

A canary is an ordinary chat completion, built by the same translation the gateway's
chat surface uses (schemas/openai_bus.py) and sent with a fresh random request id, so on
the wire it has the shape of a buyer's request and nothing marks it. Greedy (temperature
0) with a fixed seed, a few tokens, and the log-probabilities of each token and its
runner-up, which let the comparison (services/canary/compare.py) tell a near tie that
other hardware may break differently from a different model.

Honest limits: the prompts are few and fixed, so a provider that learned them could answer
them with the real model and everything else with another; canaries are a spot check of
the weights a provider runs, not an attestation.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import msgspec

from schemas import bus, openai
from schemas.openai_bus import chat_request
from services.ids import new_request_id

PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
    "Explain in one sentence what a computer is.",
    "Say hello to a new friend.",
    "What do bees make?",
)
# Any fixed value: greedy decoding ignores it, but buyers who want repeatable answers send one too.
SEED = 1234
# The runner-up of each token: enough to know how close a tie was.
TOP_LOGPROBS = 2


def body(prompt: str, tokens: int) -> dict[str, Any]:
    """The OpenAI chat body of a canary (without its model)."""
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "seed": SEED,
        "logprobs": True,
        "top_logprobs": TOP_LOGPROBS,
    }


def prompt_key(prompt: str, tokens: int) -> str:
    """What a reference answer is recorded under: the SHA-256 of the canary's whole body."""
    return hashlib.sha256(msgspec.json.encode(body(prompt, tokens), order="sorted")).hexdigest()


def request(model: str, prompt: str, tokens: int, *, deadline_s: float, keepalive_ms: int) -> bus.InferenceRequest:
    """The canary as the gateway would put a buyer's chat completion on the bus.

    `deadline_s` is the gateway's whole-request limit (MP_REQUEST_TIMEOUT_S), as on a buyer's
    request: a shorter deadline would single canaries out. So would any other field the gateway sets
    on buyers' requests (services/gateway/pipeline.py `start`): it takes bundles, as for theirs.
    """
    req = msgspec.convert({"model": model, **body(prompt, tokens)}, openai.ChatCompletionRequest)
    bus_request = chat_request(req, default_max_tokens=tokens)
    return msgspec.structs.replace(
        bus_request,
        request_id=new_request_id(),
        deadline_ms=int((time.time() + deadline_s) * 1000),
        bundle=True,
        keepalive_ms=keepalive_ms,
    )
