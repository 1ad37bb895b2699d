"""A tiny mlx-lm llama whose weights make it say one fixed thing: a sentence, then a tool call.

Random tiny weights never emit tool markup, and SmolLM2 has no tool template,
so the tests build a model that does, deterministically, through the real
stack (tokenizer, chat template, mlx-lm generation, the daemon's tool parser):

- every layer writes nothing to the residual stream (zero output projections),
  so the hidden state at each position is just the current token's embedding;
- each scripted token has its own one-hot embedding "slot", and the untied
  lm_head row of the token that must follow it reads that slot with a large
  weight; every other token shares slot 0, which leads to the end token.

So after the chat template's generation prompt ("...assistant\\n") the model
says, greedy or sampled, `SCRIPT` token by token, then ends. The tool call is
one added token holding the whole `<tool_call>...</tool_call>` markup.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Tokenizer

from tests.support.tiny_model import EOS_TOKEN
from tests.support.tool_model import TOOL_TEMPLATE

# What the model says: text pieces (each one token), then the call (one token).
TEXT_PIECES = ("Let", " me", " check", " the", " weather", ".")
TEXT = "".join(TEXT_PIECES)
CALL_NAME = "get_weather"
CALL_ARGUMENTS = {"city": "Paris"}
CALL_MARKUP = f'<tool_call>{{"name": "{CALL_NAME}", "arguments": {json.dumps(CALL_ARGUMENTS)}}}</tool_call>'
SCRIPT = (*TEXT_PIECES, CALL_MARKUP)

# Large enough that sampling at any temperature the APIs allow still follows the script.
_GAIN = 40.0


def write_script_model(
    source: Path, target: Path, *, script: tuple[str, ...] = SCRIPT, template: str = TOOL_TEMPLATE
) -> Path:
    """Copy the tiny model at `source` (its tokenizer and shape) to `target` as a model that says `script`.

    Each piece of `script` becomes one added token; the chain starts after a newline
    (the end of the chat template's generation prompt), or after any piece a template
    puts at the end of the prompt itself (the model then says the rest of the script).
    """
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    intermediate = config["intermediate_size"]

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    # Normal (not special) added tokens: they decode as their text, so the markup reaches the tool parser.
    tokenizer.add_tokens([AddedToken(piece, normalized=False) for piece in script])
    tokenizer.save(str(target / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    eos = tokenizer.token_to_id(EOS_TOKEN)
    newline = tokenizer.encode("\n", add_special_tokens=False).ids[-1]
    chain = [newline, *(tokenizer.token_to_id(piece) for piece in script), eos]
    if len(set(chain)) != len(chain) or len(chain) >= hidden:
        raise AssertionError(f"script tokens must be distinct and fewer than {hidden}: {chain}")

    embed = np.zeros((vocab, hidden), np.float32)
    embed[:, 0] = 1.0  # slot 0: every token off the script
    head = np.zeros((vocab, hidden), np.float32)
    head[eos, 0] = _GAIN  # ... is followed by the end
    for slot, (token, following) in enumerate(itertools.pairwise(chain), start=1):
        embed[token] = 0.0
        embed[token, slot] = 1.0
        head[following, slot] = _GAIN
    weights: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": embed,
        "lm_head.weight": head,
        "model.norm.weight": np.ones(hidden, np.float32),
    }
    shapes = {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for name, shape in shapes.items():
            weights[prefix + name + ".weight"] = np.zeros(shape, np.float32)
        for name, size in (("mlp.gate_proj", intermediate), ("mlp.up_proj", intermediate), ("mlp.down_proj", hidden)):
            weights[prefix + name + ".bias"] = np.zeros(size, np.float32)
        weights[prefix + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        weights[prefix + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
    mx.save_safetensors(
        str(target / "model.safetensors"),
        {k: mx.array(v) for k, v in weights.items()},
        metadata={"format": "mlx"},
    )

    config.update(vocab_size=vocab, tie_word_embeddings=False)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = template
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (target / "generation_config.json").write_text((source / "generation_config.json").read_text())
    return target


SCRIPT_MODEL = "tiny-script"
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
