"""The tiny random-weight model other tests build on: it loads offline, its
tokenizer is a streaming byte-level BPE with a ChatML template, and greedy
generation is deterministic and never stops early on a special token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

from tests.support.tiny_model import SPECIAL_TOKENS, write_tiny_model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, TokenizerWrapper]:
    path = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    model, tokenizer = mlx_lm.load(str(path))[:2]
    return model, tokenizer


def _chat_prompt(tokenizer: TokenizerWrapper) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(prompt, str)
    return prompt


def test_chat_template_ends_with_generation_prompt(loaded: tuple[Any, TokenizerWrapper]) -> None:
    _, tokenizer = loaded
    prompt = _chat_prompt(tokenizer)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # The ChatML markers must be single special tokens, not spelled out.
    ids = tokenizer.encode(prompt)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2


def test_multibyte_text_round_trips(loaded: tuple[Any, TokenizerWrapper]) -> None:
    _, tokenizer = loaded
    text = "héllo 日本 🙂 wörld"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # Never seen in training, but the byte alphabet covers it.
    unseen = "ñandú ☃ 𝄞 ﷽"
    assert tokenizer.decode(tokenizer.encode(unseen)) == unseen


def test_special_tokens_and_eos(loaded: tuple[Any, TokenizerWrapper]) -> None:
    _, tokenizer = loaded
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_ids == {2}
    assert 300 <= len(tokenizer) <= 500


def test_uses_bpe_streaming_detokenizer(loaded: tuple[Any, TokenizerWrapper]) -> None:
    _, tokenizer = loaded
    assert isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)


def test_special_logits_are_strongly_negative(loaded: tuple[Any, TokenizerWrapper]) -> None:
    model, tokenizer = loaded
    # Include special tokens as inputs too: the construction must hold after them.
    ids = tokenizer.encode(_chat_prompt(tokenizer) + "héllo 🙂<|im_end|><|im_start|>x")
    logits = model(mx.array(ids)[None])[0]
    special_max = logits[:, : len(SPECIAL_TOKENS)].max().item()
    ordinary_max = logits[:, len(SPECIAL_TOKENS) :].max(axis=-1).min().item()
    assert special_max < -10
    assert ordinary_max - special_max > 15


def test_greedy_generation_runs_full_length_deterministically(loaded: tuple[Any, TokenizerWrapper]) -> None:
    model, tokenizer = loaded
    prompt = _chat_prompt(tokenizer)

    def run() -> tuple[str, list[int]]:
        responses = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=32))
        assert responses[-1].finish_reason == "length"
        assert responses[-1].generation_tokens == 32
        return "".join(r.text for r in responses), [r.token for r in responses]

    first_text, first_tokens = run()
    assert len(first_tokens) == 32
    assert (first_text, first_tokens) == run()


def test_same_seed_writes_identical_weights(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a", seed=7)
    b = write_tiny_model(tmp_path / "b", seed=7)
    c = write_tiny_model(tmp_path / "c", seed=8)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
