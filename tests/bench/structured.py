"""`just bench structured`: what constrained decoding (response_format) costs in the worker's batch.

The worker's Runner runs in this process on a real model (SmolLM2 by default),
without daemon or gateway, so only the generation loop is measured. Cases, in
alternating order over several rounds (median kept; the machine is shared):
one free request, one constrained, four free, three free + one constrained,
four constrained. Decode speed is per sequence (tokens after the first over
the time they took), so prefill is left out. The last line is the
constraint's own time per token (consume + mask + where), the previous
token's wait excluded: wall time, overlapping the step's forward pass (on a
CPU-only machine the two share the cores, so it reads longer than alone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from infra.blas import fast_blas_env

# Long answers: one free string per object, so the model writes until max_tokens.
STORY = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
}
LAYOUT: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _rates(runner: Any, prompts: list[list[int]], grammars: list[str | None], tokens: int, tag: str) -> list[float]:
    from daemon.worker import protocol as p

    arrivals: dict[str, list[float]] = {}

    def emit(message: Any) -> None:
        if isinstance(message, p.Tokens):
            now = time.perf_counter()
            for item in message.items:
                arrivals.setdefault(item.id, []).append(now)

    runner.emit = emit
    for i, grammar in enumerate(grammars):
        job = p.Generate(
            id=f"{tag}-{i}", prompt=prompts[i], max_tokens=tokens, temperature=0.8, seed=i, grammar=grammar
        )
        runner.submit(job)
    while runner.by_uid:
        runner.step()
    runner.prompt_cache.trim_to(n_sequences=0)
    return [(len(ts) - 1) / (ts[-1] - ts[0]) for ts in arrivals.values() if len(ts) > 5]


def run(model_path: Path, tokens: int, rounds: int) -> None:
    import mlx.core as mx
    import numpy as np
    from llguidance import LLMatcher
    from mlx_lm import load

    from daemon.worker import runner as runner_module
    from daemon.worker.grammar import Constraint, grammar_tokenizer

    model, tokenizer = load(str(model_path))[:2]
    vocab = int(getattr(model.args, "vocab_size", 0) or len(tokenizer))
    started = time.perf_counter()
    ll_tokenizer = grammar_tokenizer(tokenizer, vocab)
    built_s = time.perf_counter() - started
    if ll_tokenizer is None:
        raise SystemExit("llguidance cannot read this model's tokenizer")
    costs: list[float] = []

    class Timed(Constraint):
        def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
            # Queued and waited for here: the previous token and the forward pass's launch are not
            # the constraint's own cost (inside, the same calls then find them done).
            mx.async_eval(tokens)
            mx.async_eval(logits)
            mx.eval(tokens)
            t = time.perf_counter()
            out = super().__call__(tokens, logits)
            costs.append(time.perf_counter() - t)
            return out

    runner_module.Constraint = Timed  # type: ignore[misc]
    runner = runner_module.Runner(
        model=model,
        model_key=str(model_path),
        eos_token_ids=sorted(tokenizer.eos_token_ids),
        vocab_size=vocab,
        emit=lambda _: None,
        slots=4,
        cache_entries=0,
        grammar_tokenizer=ll_tokenizer,
    )
    story = LLMatcher.grammar_from_json_schema(STORY, defaults=LAYOUT)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a long story about the sea, number {i}."}], add_generation_prompt=True
        )
        for i in range(4)
    ]
    cases: list[tuple[str, list[str | None]]] = [
        ("1 free", [None]),
        ("1 constrained", [story]),
        ("4 free", [None] * 4),
        ("3 free + 1 constrained", [None, None, None, story]),
        ("4 constrained", [story] * 4),
    ]
    _rates(runner, prompts, [None, story], 8, "warm-up")
    measured: dict[str, list[float]] = {label: [] for label, _ in cases}
    for r in range(rounds):
        for label, grammars in cases if r % 2 == 0 else cases[::-1]:
            measured[label].append(statistics.median(_rates(runner, prompts, grammars, tokens, f"{label}-{r}")))
    base = {1: statistics.median(measured["1 free"]), 4: statistics.median(measured["4 free"])}
    print(f"\nconstrained decoding on {model_path.name}: {tokens} tokens, {rounds} rounds (median)")
    print(f"llguidance tokenizer view built in {built_s:.2f} s (once per loaded model)\n")
    print(f"{'case':24s} {'tok/s per sequence':>19s} {'tok/s batch':>12s} {'vs free':>8s}")
    for label, grammars in cases:
        rate = statistics.median(measured[label])
        change = rate / base[len(grammars)] - 1
        print(f"{label:24s} {rate:19.1f} {rate * len(grammars):12.1f} {change:+8.1%}")
    per_token = np.array(costs) * 1e3
    print(
        f"\nconstraint time per token (beside the forward pass): median {np.median(per_token):.3f} ms, "
        f"p90 {np.percentile(per_token, 90):.3f} ms, max {per_token.max():.2f} ms ({len(per_token)} tokens)"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.bench structured")
    parser.add_argument("--model-path", type=Path, default=None, help="an mlx-lm model folder (default: SmolLM2)")
    parser.add_argument("--tokens", type=int, default=80, help="max_tokens per request (default 80)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (default 4)")
    args = parser.parse_args(argv)
    preload = fast_blas_env()
    if preload and os.environ.get("LD_PRELOAD") != preload["LD_PRELOAD"]:
        # The daemon's worker runs with the faster BLAS preloaded: measure the same (it must be set at exec).
        os.execve(sys.executable, [sys.executable, "-m", "tests.bench", "structured", *argv], {**os.environ, **preload})
    model_path = args.model_path
    if model_path is None:
        from daemon.models.smollm2 import ensure_smollm2

        model_path = ensure_smollm2(Path(os.environ.get("MP_TEST_CACHE", ".mp/test-cache")) / "models")
    run(model_path.resolve(), args.tokens, args.rounds)
    return 0
