"""A tiny random-weight mlx-lm ``llama`` model that tests write for themselves.

No model hub is reachable from the test machines, so instead of downloading a
checkpoint the tests build one: a byte-level BPE tokenizer trained on a few
built-in lines, and a 2-layer llama with seeded random weights.  The result
loads with ``mlx_lm.load(str(path))`` like any converted model folder.

The weights are random but constructed so that the special tokens (EOS and
the ChatML markers) always get strongly negative logits: a test that asks for
N tokens gets exactly N tokens (finish_reason ``"length"``), greedy or
sampled.  See ``_weights`` for how.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["CHAT_TEMPLATE", "EOS_TOKEN", "SPECIAL_TOKENS", "write_tiny_model"]

# Registered first, so they get ids 0, 1, 2 in this order.
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Multi-byte text (accents, CJK, emoji) repeats often enough that BPE learns
# merges inside UTF-8 sequences, so the vocabulary holds tokens that are only
# part of a character -- the case streaming detokenizers must handle.
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "I am fine, thank you. And you?",
    "The weather is nice and the sun is shining.",
    "Please write a short poem about the sea.",
    "The sea is deep, the sea is wide, the sea is blue.",
    "Once upon a time there was a little model that could.",
    "It generated one token after another, all day long.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.",
    "def hello(name: str) -> str:\n    return f'Hello, {name}!'",
    '{"role": "user", "content": "hi"}',
    "Café, naïve, résumé, déjà vu, crème brûlée, façade.",
    "Ich möchte über die Brücke gehen; schön, größer, Grüße.",
    "El niño comió piña en la montaña; ¿qué más?",
    "Zoë and Chloé visited São Paulo and Kraków.",
    "日本語のテキストです。東京は日本の首都です。",
    "日本 日本 日本人 日本語 東京 京都 大阪",
    "你好，世界！我们在学习中文。中文很有意思。",
    "中国 中文 你好 世界 学习 我们",
    "안녕하세요, 세계! 한국어 텍스트입니다.",
    "Привет, мир! Как дела? Всё хорошо.",
    "Γειά σου κόσμε! Καλημέρα.",
    "مرحبا بالعالم",
    "Emoji: 🙂 😀 🎉 🚀 ❤️ 👍 🙂🙂 🎉🎉 🚀🚀",
    "I love pizza 🍕 and coffee ☕ in the morning 🌅.",
    "Good job! 👍👍 Party time 🎉🎉🎉 Smile 🙂🙂🙂",
    "héllo wörld, héllo again, wörld again.",
    "Mixed: héllo 日本 🙂 wörld — “quotes” and ‘apostrophes’ … ellipsis.",
    "Math: α + β = γ, ∑ x² ≤ ∞, π ≈ 3.14159, √2, ±1, °C.",
    "Currency: €100, £50, ¥1000, ₹20, $5.",
    "Tabs\tand\tnewlines\nare\nwhitespace too.",
    "The end. The end. The end.",
)

_VOCAB_SIZE = 400
_HIDDEN = 64
_LAYERS = 2
_HEADS = 4
_KV_HEADS = 2
_INTERMEDIATE = 128
_HEAD_DIM = _HIDDEN // _HEADS


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # A ByteLevel decoder is what makes mlx-lm pick BPEStreamingDetokenizer.
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any text (even unseen scripts) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


def _weights(vocab_size: int, special_ids: list[int], seed: int) -> dict[str, mx.array]:
    """Seeded llama weights whose special tokens can never win the argmax.

    Hidden dimension 0 is a reserved "bias channel":
    - no projection reads it (column 0 of q/k/v/gate/up is zero) and none
      writes it (row 0 of o/down is zero), except the MLP down-projection bias,
      which adds +1 to it in every layer;
    - ordinary tokens have 0 in it, special tokens have -1 and nothing else
      (up to a little noise so they stay distinguishable as inputs).
    So at the final norm channel 0 holds +2 (ordinary input) or +1 (special
    input): always positive.  With tied embeddings the lm_head is the
    embedding, so a special token's logit is -1 * h[0] where
    h[0] = norm.weight[0] * x[0] / rms(x) > 0, and norm.weight[0] is large:
    the special logits sit far below the ordinary ones, whose mean is 0.
    """
    rng = np.random.RandomState(seed)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    # Ordinary embedding rows: std 0.3 gives logits of std ~2-3, so the
    # softmax is neither flat nor one-hot.
    embed = normal((vocab_size, _HIDDEN), 0.3)
    embed[:, 0] = 0.0
    embed[special_ids, 1:] *= 0.05
    embed[special_ids, 0] = -1.0

    weights: dict[str, np.ndarray] = {"model.embed_tokens.weight": embed}
    for layer in range(_LAYERS):
        prefix = f"model.layers.{layer}."
        reads = {
            "self_attn.q_proj": _HEADS * _HEAD_DIM,
            "self_attn.k_proj": _KV_HEADS * _HEAD_DIM,
            "self_attn.v_proj": _KV_HEADS * _HEAD_DIM,
            "mlp.gate_proj": _INTERMEDIATE,
            "mlp.up_proj": _INTERMEDIATE,
        }
        for name, out_dim in reads.items():
            w = normal((out_dim, _HIDDEN), _HIDDEN**-0.5)
            w[:, 0] = 0.0  # blind to the bias channel
            weights[prefix + name + ".weight"] = w
        writes = {"self_attn.o_proj": _HEADS * _HEAD_DIM, "mlp.down_proj": _INTERMEDIATE}
        for name, in_dim in writes.items():
            w = normal((_HIDDEN, in_dim), in_dim**-0.5)
            w[0, :] = 0.0  # never writes the bias channel
            weights[prefix + name + ".weight"] = w
        weights[prefix + "mlp.gate_proj.bias"] = np.zeros(_INTERMEDIATE, np.float32)
        weights[prefix + "mlp.up_proj.bias"] = np.zeros(_INTERMEDIATE, np.float32)
        down_bias = np.zeros(_HIDDEN, np.float32)
        down_bias[0] = 1.0
        weights[prefix + "mlp.down_proj.bias"] = down_bias
        weights[prefix + "input_layernorm.weight"] = np.ones(_HIDDEN, np.float32)
        weights[prefix + "post_attention_layernorm.weight"] = np.ones(_HIDDEN, np.float32)
    # Random signs on the final norm: with tied embeddings the logit of the
    # input token itself would otherwise be ~|e|^2 and greedy decoding would
    # just repeat it ("TTTTT").
    final_norm = np.where(rng.rand(_HIDDEN) < 0.5, -1.0, 1.0).astype(np.float32)
    final_norm[0] = 32.0
    weights["model.norm.weight"] = final_norm
    return {name: mx.array(value) for name, value in weights.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_model(path: Path, *, seed: int = 0, context_length: int = 2048) -> Path:
    """Write a loadable mlx-lm llama model folder at ``path`` and return ``path``.

    The tokenizer is the same for every seed; the weights depend only on
    ``seed`` (same seed, byte-identical ``model.safetensors``).
    """
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    # The trainer puts special tokens first; tests rely on these exact ids.
    special_ids = list(range(len(SPECIAL_TOKENS)))
    actual_ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if actual_ids != special_ids:
        raise AssertionError(f"special tokens got ids {actual_ids}")
    vocab_size = tokenizer.get_vocab_size()
    eos_id = SPECIAL_TOKENS.index(EOS_TOKEN)

    tokenizer.save(str(path / "tokenizer.json"))
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|endoftext|>",
            "eos_token": EOS_TOKEN,
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 2048,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        path / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": _HIDDEN,
            "num_hidden_layers": _LAYERS,
            "num_attention_heads": _HEADS,
            "num_key_value_heads": _KV_HEADS,
            "head_dim": _HEAD_DIM,
            "intermediate_size": _INTERMEDIATE,
            "vocab_size": vocab_size,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": context_length,
            "tie_word_embeddings": True,
            "attention_bias": False,
            # The down-projection bias feeds the bias channel (see _weights).
            "mlp_bias": True,
            "bos_token_id": 0,
            "eos_token_id": eos_id,
            "torch_dtype": "float32",
        },
    )
    _write_json(path / "generation_config.json", {"bos_token_id": 0, "eos_token_id": eos_id})
    mx.save_safetensors(
        str(path / "model.safetensors"),
        _weights(vocab_size, special_ids, seed),
        metadata={"format": "mlx"},
    )
    return path
