"""From a request to prompt tokens: the model's chat template, tools, template kwargs.

`render` runs in a prepare helper process (daemon/engine/prepare_process.py),
off the daemon's event loop and under a time limit: a chat template is a
program, and the buyer chooses its input. The request is still checked and
counted before it reaches the worker, even while the worker is reloading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from daemon.engine.base import EngineError, ThinkTags
from schemas import bus, limits

_ROLE_FOR_TEMPLATE = {"developer": "system"}
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
# Prompt tokens read back to see how the generation prompt ends (a think tag is 1-3 tokens).
_TAIL_TOKENS = 16


def load_tokenizer(path: Path) -> Any:
    """The model's tokenizer, as mlx-lm loads it (the daemon and the prepare helpers load the same)."""
    from mlx_lm.utils import load_config
    from mlx_lm.utils import load_tokenizer as load

    return load(path, eos_token_ids=load_config(path).get("eos_token_id"))


def _arguments(text: str) -> Any:
    # Chat templates expect a mapping (transformers' convention); keep text that is not JSON as is
    # (nested too deep for the parser included).
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def template_kwargs(request: bus.InferenceRequest) -> dict[str, Any]:
    """The request's chat_template_kwargs, checked again here: the bus is input too.

    Only the variables templates read to select their behaviour (schemas/limits.py); anything
    else could replace the template itself or apply_chat_template's own options.
    """
    raw = request.chat_template_kwargs or {}
    try:
        checked = msgspec.convert(raw, limits.ChatTemplateKwargs)
    except msgspec.ValidationError as exc:
        param, detail = limits.explain(exc)
        param = f"chat_template_kwargs.{param}" if param else "chat_template_kwargs"
        raise EngineError("invalid_value", f"chat_template_kwargs: {detail} ({param})", param=param) from None
    return limits.template_kwargs(checked) or {}


def template_messages(messages: list[bus.BusMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": _ROLE_FOR_TEMPLATE.get(m.role, m.role), "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            item["name"] = m.name
        out.append(item)
    return out


def tools_offered(request: bus.InferenceRequest) -> list[dict[str, Any]] | None:
    """The tools the model may call, after tool_choice ("none" hides them; a named function keeps only it)."""
    tools = request.tools or None
    choice = request.tool_choice
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        chosen = [t for t in tools if (t.get("function") or {}).get("name") == name]
        if not chosen:
            raise EngineError(
                "invalid_value", f"tool_choice names {name!r}, which is not in tools", param="tool_choice"
            )
        return chosen
    if choice not in (None, "auto", "required"):
        raise EngineError("invalid_value", f"tool_choice {choice!r} is not none, auto or required", param="tool_choice")
    return list(tools)


def encode(tokenizer: Any, request: bus.InferenceRequest) -> list[int]:
    """Prompt tokens for a request; a continuation appends the tokens earlier providers generated."""
    tokens = render(tokenizer, request)
    if request.continuation is not None:
        tokens.extend(request.continuation.token_ids)
    return tokens


def thinking(tokenizer: Any, request: bus.InferenceRequest, tokens: list[int]) -> ThinkTags | None:
    """The think tags of a chat request on a model that thinks (None: its output is all answer).

    Raw prompts (/v1/completions) are the buyer's own text: their output stays text.
    A template that opens the block itself (Qwen3-style: the generation prompt ends
    with `<think>` while thinking is on) starts the answer inside it; only the
    prompt's tail is read, so a tag the buyer typed in a message decides nothing.
    """
    if request.prompt is not None or not getattr(tokenizer, "has_thinking", False):
        return None
    if request.continuation is not None:
        tokens = tokens[: len(tokens) - len(request.continuation.token_ids)]
    start, end = tokenizer.think_start, tokenizer.think_end
    tail = str(tokenizer.decode(tokens[-_TAIL_TOKENS:])).rstrip()
    return ThinkTags(start=start, end=end, opened=tail.endswith(start))


def render(tokenizer: Any, request: bus.InferenceRequest) -> list[int]:
    """The prompt's tokens: the chat template applied to the messages, or a raw prompt as is (slow: off the loop)."""
    if request.prompt is not None:
        return list(tokenizer.encode(request.prompt))
    if not request.messages:
        raise EngineError("invalid_messages", "messages must not be empty", param="messages")
    kwargs = template_kwargs(request)
    effort = request.reasoning_effort
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise EngineError(
                "invalid_value",
                f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}",
                param="reasoning_effort",
            )
        # On models that think, the effort gates the thinking channel; others ignore it.
        kwargs["enable_thinking"] = effort != "none"
    if request.params.response_format is not None:
        # The grammar forces JSON from the first token: a template must not open a thinking block.
        kwargs["enable_thinking"] = False
    tools = tools_offered(request)
    messages = template_messages(request.messages)
    if not getattr(tokenizer, "has_chat_template", True):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return list(tokenizer.encode(text))
    try:
        tokens = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, tools=tools, **kwargs
        )
    except Exception as exc:
        raise EngineError(
            "invalid_messages", f"the model's chat template rejected the messages: {exc}", param="messages"
        ) from None
    if isinstance(tokens, dict):  # some tokenizers return a BatchEncoding
        tokens = tokens["input_ids"]
    return list(tokens)
