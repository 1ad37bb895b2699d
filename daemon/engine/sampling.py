"""Sampling fields: validation (400 naming the field), and the model author's defaults.

A field the request omits takes the value from the model's
`generation_config.json` when it has one, else OpenAI's default; an explicit
request value always wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.engine.base import EngineError
from schemas import bus, limits

# The most any surface accepts (Anthropic's stop_sequences: 16; OpenAI's stop: 4).
MAX_STOP_SEQUENCES = limits.MAX_STOP_SEQUENCES_ANTHROPIC
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> GenerationDefaults:
        path = model_dir / "generation_config.json"
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls()

        def number(name: str) -> float | None:
            value = raw.get(name)
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

        temperature = number("temperature")
        if raw.get("do_sample") is False:
            # The author's checkpoint decodes greedily unless asked otherwise.
            temperature = 0.0
        top_k = number("top_k")
        return cls(
            temperature=temperature,
            top_p=number("top_p"),
            top_k=int(top_k) if top_k is not None else None,
            min_p=number("min_p"),
            repetition_penalty=number("repetition_penalty"),
        )


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    repetition_penalty: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    logit_bias: dict[int, float] | None
    # -1: none; 0: sampled token only; n: plus n alternatives (the worker's convention).
    logprobs: int


def _bad(param: str, message: str) -> EngineError:
    return EngineError("invalid_value", message, param=param)


def _check_range(param: str, value: float | None, low: float, high: float, *, low_open: bool = False) -> None:
    if value is None:
        return
    if value != value or value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise _bad(param, f"{param} must be in {bracket}{low}, {high}], got {value}")


def validate_stop(stop: list[str]) -> None:
    if len(stop) > MAX_STOP_SEQUENCES:
        raise _bad("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stop)}")
    if any(not s for s in stop):
        raise _bad("stop", "stop sequences must not be empty")
    if any(len(s) > limits.MAX_STOP_CHARS for s in stop):
        raise _bad("stop", f"stop sequences are at most {limits.MAX_STOP_CHARS} characters")


def resolve(params: bus.SamplingParams, defaults: GenerationDefaults, *, vocab_size: int) -> Sampling:
    """Validate every field and fill the omitted ones; raises EngineError(invalid_value, param=...)."""
    if params.max_tokens < 1:
        raise _bad("max_tokens", f"max_tokens must be at least 1, got {params.max_tokens}")
    _check_range("temperature", params.temperature, 0.0, 2.0)
    _check_range("top_p", params.top_p, 0.0, 1.0, low_open=True)
    _check_range("min_p", params.min_p, 0.0, 1.0)
    _check_range("repetition_penalty", params.repetition_penalty, 0.0, 10.0, low_open=True)
    _check_range("presence_penalty", params.presence_penalty, -2.0, 2.0)
    _check_range("frequency_penalty", params.frequency_penalty, -2.0, 2.0)
    if params.top_k is not None and params.top_k < 0:
        raise _bad("top_k", f"top_k must be 0 (off) or positive, got {params.top_k}")
    if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        raise _bad("top_logprobs", f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {params.top_logprobs}")
    if params.top_logprobs and not params.logprobs:
        raise _bad("top_logprobs", "top_logprobs needs logprobs: true")
    validate_stop(params.stop)
    if params.logit_bias:
        if len(params.logit_bias) > limits.MAX_LOGIT_BIAS:
            raise _bad("logit_bias", f"at most {limits.MAX_LOGIT_BIAS} logit_bias entries")
        for token, bias in params.logit_bias.items():
            if not 0 <= token < vocab_size:
                raise _bad("logit_bias", f"logit_bias names token {token}, outside this model's vocabulary")
            _check_range("logit_bias", bias, -100.0, 100.0)

    def pick(value: float | None, default: float | None, fallback: float) -> float:
        return value if value is not None else default if default is not None else fallback

    top_k = params.top_k if params.top_k is not None else defaults.top_k or 0
    repetition = params.repetition_penalty if params.repetition_penalty is not None else defaults.repetition_penalty
    return Sampling(
        temperature=pick(params.temperature, defaults.temperature, 1.0),
        top_p=pick(params.top_p, defaults.top_p, 1.0),
        # top_k at or above the vocabulary keeps every token: the same as off.
        top_k=top_k if 0 < top_k < vocab_size else 0,
        min_p=pick(params.min_p, defaults.min_p, 0.0),
        # Seeds become PRNG keys (unsigned 64-bit); any integer maps onto one.
        seed=params.seed % (1 << 64) if params.seed is not None else None,
        repetition_penalty=repetition if repetition not in (None, 1.0) else None,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
        logit_bias=dict(params.logit_bias) if params.logit_bias else None,
        logprobs=params.top_logprobs if params.logprobs else -1,
    )
