"""Turn a llama-family GGUF file into an mlx-lm model folder.

`mx.load` reads GGUF tensors directly (quantized ones as MLX affine triples),
so the conversion is a renaming plus a tokenizer rebuilt from the GGUF
metadata. No network, no hub: the folder is loadable by `mlx_lm.load`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_SPECIAL_TOKEN_TYPE = 3  # GGUF token_type "control"


def _scalar(meta: dict[str, Any], key: str) -> Any:
    value = meta[key]
    return value.item() if hasattr(value, "item") else value


def _rename(name: str) -> str:
    stem, _, suffix = name.rpartition(".")  # suffix: weight / scales / biases
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    return f"{_TOP_NAMES[stem]}.{suffix}"


def _bits_of(weights: dict[str, mx.array], name: str) -> int | None:
    """Bits per weight of a quantized tensor (None when not quantized)."""
    scales = weights.get(f"{name}.scales")
    if scales is None:
        return None
    packed = weights[f"{name}.weight"].shape[-1] * 32
    return packed // (scales.shape[-1] * 32)


def _tokenizer_json(meta: dict[str, Any]) -> dict[str, Any]:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre: list[Any] = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if meta.get("tokenizer.ggml.pre") == "smollm":
        # SmolLM's pre-tokenizer splits every digit off before the byte-level regex.
        pre.insert(0, pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()  # makes mlx-lm pick its streaming BPE detokenizer
    types = meta["tokenizer.ggml.token_type"].tolist()
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _SPECIAL_TOKEN_TYPE]
    )
    return json.loads(tok.to_str())


def convert_gguf(gguf_path: Path, out_dir: Path, *, dequantize: bool = False) -> Path:
    """Write an mlx-lm folder for `gguf_path` into `out_dir` atomically.

    `dequantize=True` stores float32 weights: on Linux CPUs MLX's quantized
    kernels are several times slower than a float32 GEMV.
    """
    loaded: Any = mx.load(str(gguf_path), return_metadata=True)
    weights_raw: dict[str, mx.array] = loaded[0]
    meta: dict[str, Any] = loaded[1]
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"unsupported GGUF architecture {meta.get('general.architecture')!r}")

    weights = {_rename(k): v for k, v in weights_raw.items()}
    quant: dict[str, Any] = {}
    for name in sorted({k.rsplit(".", 1)[0] for k in weights}):
        bits = _bits_of(weights, name)
        if bits is None:
            continue
        if dequantize:
            w = mx.dequantize(
                weights.pop(f"{name}.weight"),
                weights.pop(f"{name}.scales"),
                weights.pop(f"{name}.biases"),
                group_size=32,
                bits=bits,
            )
            weights[f"{name}.weight"] = w.astype(mx.float32)
        else:
            quant[name] = {"group_size": 32, "bits": bits}

    arch = "llama"
    n_heads = int(_scalar(meta, f"{arch}.attention.head_count"))
    hidden = int(_scalar(meta, f"{arch}.embedding_length"))
    tokens = list(meta["tokenizer.ggml.tokens"])
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(meta, f"{arch}.block_count")),
        "intermediate_size": int(_scalar(meta, f"{arch}.feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_scalar(meta, f"{arch}.attention.head_count_kv")),
        "head_dim": hidden // n_heads,
        "rms_norm_eps": float(_scalar(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
        "vocab_size": len(tokens),
        "rope_theta": float(_scalar(meta, f"{arch}.rope.freq_base")),
        # GGUF permutes q/k rows for the interleaved rotary layout.
        "rope_traditional": True,
        "max_position_embeddings": int(_scalar(meta, f"{arch}.context_length")),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id")),
    }
    if quant:
        # Per-layer entries carry the real widths (embedding Q8_0, the rest Q4_1).
        config["quantization"] = {"group_size": 32, "bits": 4, **quant}

    bos = tokens[config["bos_token_id"]]
    eos = tokens[config["eos_token_id"]]
    pad_id = meta.get("tokenizer.ggml.padding_token_id")
    pad = tokens[int(_scalar(meta, "tokenizer.ggml.padding_token_id"))] if pad_id is not None else eos
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": bos,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta["tokenizer.chat_template"],
    }
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(_tokenizer_json(meta)))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
