"""Structured output without a daemon: the daemon's schema checks and the worker's grammar mask."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.utils import load_config, load_tokenizer

from daemon.engine.base import EngineError
from daemon.engine.structured import grammar
from daemon.worker.grammar import Constraint, GrammarError, grammar_tokenizer
from schemas import bus

# Pure: no server, no process, no network (`just test -m unit`).
pytestmark = pytest.mark.unit

FLAT = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


def _request(fmt: bus.ResponseFormat | None, **extra: Any) -> bus.InferenceRequest:
    return bus.InferenceRequest(
        request_id="r",
        model="m",
        messages=[bus.BusMessage(role="user", content="hi")],
        params=bus.SamplingParams(max_tokens=8, response_format=fmt),
        **extra,
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: Path) -> Any:
    return load_tokenizer(tiny_model_path, eos_token_ids=load_config(tiny_model_path).get("eos_token_id"))


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer: Any) -> Any:
    built = grammar_tokenizer(tokenizer, len(tokenizer._tokenizer) + 7)  # logits wider than the vocabulary
    assert built is not None
    return built


def test_free_text_has_no_grammar_and_json_formats_compile() -> None:
    assert grammar(_request(None)) is None
    assert "json_schema" in (grammar(_request(bus.ResponseFormat(type="json_object"))) or "")
    compiled = grammar(_request(bus.ResponseFormat(type="json_schema", schema=FLAT)))
    assert compiled is not None
    assert '"ok"' in compiled


@pytest.mark.parametrize(
    ("fmt", "extra", "code", "param"),
    [
        (bus.ResponseFormat(type="json_schema"), {}, "invalid_value", "response_format.json_schema.schema"),
        (
            bus.ResponseFormat(type="json_schema", schema={"type": "nope"}),
            {},
            "invalid_value",
            "response_format.json_schema.schema",
        ),
        (
            bus.ResponseFormat(type="json_object"),
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "unsupported_value",
            "response_format",
        ),
    ],
)
def test_refusals_name_the_field(fmt: bus.ResponseFormat, extra: dict[str, Any], code: str, param: str) -> None:
    with pytest.raises(EngineError) as err:
        grammar(_request(fmt, **extra))
    assert (err.value.code, err.value.param) == (code, param)


def test_tools_hidden_by_tool_choice_none_do_not_conflict() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert grammar(_request(bus.ResponseFormat(type="json_object"), tools=tools, tool_choice="none")) is not None


def _decode(tokenizer: Any, ll_tokenizer: Any, compiled: str, prefix: list[int], prompt: list[int]) -> list[int]:
    """Greedy decoding from uniform logits tilted towards high ids: whatever the mask leaves."""
    constraint = Constraint(ll_tokenizer, compiled, prefix)
    width = ll_tokenizer.vocab_size
    tilt = mx.arange(width, dtype=mx.float32)[None] / width
    context = list(prompt) + list(prefix)
    out: list[int] = []
    for _ in range(60):
        masked = constraint(mx.array(context), tilt)
        token: int = mx.argmax(masked, axis=-1).item()  # type: ignore[assignment]
        if token in tokenizer.eos_token_ids:
            # Only once the object is complete; the look-ahead call after EOS must not fail.
            constraint(mx.array([*context, token]), tilt)
            assert constraint.error == ""
            return out
        out.append(token)
        context.append(token)
    raise AssertionError(f"no EOS after {tokenizer.decode(out)!r}")


def test_the_mask_allows_only_the_grammar_and_eos_only_at_the_end(tokenizer: Any, ll_tokenizer: Any) -> None:
    compiled = grammar(_request(bus.ResponseFormat(type="json_schema", schema=FLAT)))
    assert compiled is not None
    out = _decode(tokenizer, ll_tokenizer, compiled, [], [5, 6, 7])
    assert json.loads(tokenizer.decode(out)) in ({"ok": True}, {"ok": False})


def test_a_continuation_prefix_is_consumed_first(tokenizer: Any, ll_tokenizer: Any) -> None:
    compiled = grammar(_request(bus.ResponseFormat(type="json_schema", schema=FLAT)))
    assert compiled is not None
    prefix = tokenizer.encode('{"ok": f', add_special_tokens=False)
    rest = _decode(tokenizer, ll_tokenizer, compiled, prefix, [5, 6, 7])
    assert json.loads(tokenizer.decode(prefix + rest)) == {"ok": False}
    with pytest.raises(GrammarError):
        Constraint(ll_tokenizer, compiled, tokenizer.encode("hello", add_special_tokens=False))
