"""A scripted tiny model that thinks: `<think>The user greets me</think>Hello there!`, then ends.

Built like the tool-calling script model (tests/support/script_model.py): one
added token per piece, weights that chain them. `<think>` and `</think>` are in
the vocabulary, so mlx-lm's TokenizerWrapper reports `has_thinking`, and the
chat template (the tool template, so tool markup parses too) has the two
generation prompts real thinking models use:

- `chat_template_kwargs={"thinking": true}` (DeepSeek V3.1's variable): the prompt ends with `<think>`
  (Qwen3-style templates open the block themselves); the model, reading that
  token, says the rest of the script: the answer begins inside the block;
- `enable_thinking=false` (or `reasoning_effort: "none"`): the prompt ends with
  an empty `<think></think>`, and the model answers at once with no reasoning.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.script_model import write_script_model
from tests.support.tool_model import TOOL_TEMPLATE

REASONING_PIECES = ("The", " user", " greets", " me")
ANSWER_PIECES = ("Hello", " there", "!")
REASONING = "".join(REASONING_PIECES)
ANSWER = "".join(ANSWER_PIECES)
THINK_SCRIPT = ("<think>", *REASONING_PIECES, "</think>", *ANSWER_PIECES)

_GENERATION_PROMPT = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
THINK_TEMPLATE = TOOL_TEMPLATE.replace(
    _GENERATION_PROMPT,
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think></think>' }}"
    "{% elif thinking is defined and thinking %}{{ '<think>' }}{% endif %}{% endif %}",
)
assert THINK_TEMPLATE != TOOL_TEMPLATE, "the tool template's generation prompt changed"


def write_think_model(source: Path, target: Path) -> Path:
    """The tiny model at `source` (tokenizer and shape) as the thinking script model at `target`."""
    return write_script_model(source, target, script=THINK_SCRIPT, template=THINK_TEMPLATE)
