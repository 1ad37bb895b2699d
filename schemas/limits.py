"""Bounds on what a request may carry: generous for honest clients, finite for hostile ones.

Every surface (the gateway's chat, completions, Messages and Responses routes,
and the daemon's local API) decodes bodies into the structs of schemas/, so a
bound set here holds everywhere: per-field bounds are `msgspec.Meta`
constraints (msgspec names the field), the rest are checked in the request
structs' `__post_init__`, which raises `LimitExceeded` naming the field. The
README's "Limits" table lists each one; change them here only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any

import msgspec
import msgspec.inspect as mi
from msgspec import Meta

# ---- the bounds --------------------------------------------------------------------------

# Messages (chat, Messages) and input items (Responses) in one request: OpenAI allows 2048.
MAX_MESSAGES = 10_000
# All the conversation's text together, in UTF-8 bytes (about 1.5 million tokens, more than any
# model here reads; the bus carries 8 MiB, and the rest of the request must fit beside it).
MAX_CONVERSATION_BYTES = 6 << 20
# One text (a message's content, a content part, a legacy prompt, instructions, a tool call's
# arguments): no longer than the whole, but refused as soon as it is read, naming its field.
MAX_TEXT_CHARS = MAX_CONVERSATION_BYTES
# Text parts in one message's content.
MAX_CONTENT_PARTS = 1_000
# Tools offered (OpenAI allows 128), each tool's JSON, and all of them together.
MAX_TOOLS = 512
MAX_TOOL_BYTES = 64 << 10
MAX_TOOLS_BYTES = 1 << 20
# Tool calls in one assistant turn.
MAX_TOOL_CALLS = 512
# A response_format / text.format JSON schema.
MAX_SCHEMA_BYTES = 256 << 10
# Properties one object of a response_format schema may declare, and pattern-keyed ones.
# llguidance's parser takes every optional property as a branch of one Earley row (limit 2000
# items, about 500 properties: past it the answer fails at its first token), and builds an
# automaton over all patternProperties at once (300 took 4 s, 600 took 70 s here).
MAX_SCHEMA_PROPERTIES = 400
MAX_SCHEMA_PATTERN_PROPERTIES = 32
# Nesting of any free-form JSON (tool parameters, schemas, tool inputs): objects and arrays.
MAX_JSON_DEPTH = 64
# Stop strings: how many (OpenAI allows 4, Anthropic's stop_sequences here 16) and how long.
MAX_STOP_SEQUENCES = 4
MAX_STOP_SEQUENCES_ANTHROPIC = 16
MAX_STOP_CHARS = 1_000
# logit_bias entries.
MAX_LOGIT_BIAS = 1_024
# Names and ids a buyer sends back (tool call ids, function names, message names).
MAX_NAME_CHARS = 256
# A chat_template_kwargs string value.
MAX_TEMPLATE_VALUE_CHARS = 256

# ---- reusable field types ---------------------------------------------------------------

# Model ids are provider-reported names like "mlx-community/Llama-3.2-3B-Instruct-4bit"
# ("." and "/" are fine: ids never become NATS subject tokens), but NATS wildcards,
# whitespace and control characters are refused before anything is published.
MODEL_ID_PATTERN = r"^[^\s*>\x00-\x1f\x7f]+$"
# Free text stored or shown elsewhere (feedback comments): tab and line breaks, no other control characters.
PLAIN_TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
# Ids we issue: letters, digits, "-" and "_".
ISSUED_ID_PATTERN = r"^[A-Za-z0-9_-]+$"

ModelId = Annotated[str, Meta(min_length=1, max_length=256, pattern=MODEL_ID_PATTERN)]
Text = Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]
Name = Annotated[str, Meta(max_length=MAX_NAME_CHARS)]
StopText = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)]
Int64 = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
# Counts that go to the bus as machine integers (top_k and the like).
Count = Annotated[int, Meta(ge=0, le=(1 << 31) - 1)]

# What a failed pattern means, for the error message (msgspec only prints the regex).
PATTERN_HELP = {
    MODEL_ID_PATTERN: "contains characters that are not allowed (whitespace, control characters, * or >)",
    PLAIN_TEXT_PATTERN: "contains control characters (only tab and line breaks are allowed)",
    ISSUED_ID_PATTERN: "is not an id we issue (letters, digits, - and _ only)",
}

# ---- chat_template_kwargs ----------------------------------------------------------------

_TemplateText = Annotated[str, Meta(max_length=MAX_TEMPLATE_VALUE_CHARS, pattern=PLAIN_TEXT_PATTERN)]
_TemplateInt = Annotated[int, Meta(ge=-(1 << 31), le=(1 << 31) - 1)]

# The variables real chat templates read to select their behaviour, and nothing else: the
# buyer's kwargs are merged into the template's context, so any other name could replace the
# template itself (`chat_template`), apply_chat_template's own options (`tokenize`, `tools`,
# `documents`, `continue_final_message`, ...) or a variable the template sets for itself.
TEMPLATE_KWARGS: dict[str, Any] = {
    # Qwen3 / Qwen3.5, GLM-4.5+, SmolLM3, Hunyuan, ERNIE 4.5: thinking on or off.
    "enable_thinking": bool,
    # DeepSeek V3.1+, IBM Granite 3.2+, Kimi: thinking on or off.
    "thinking": bool,
    # gpt-oss ("low" / "medium" / "high"), Hunyuan, Solar, Command A: how hard to think.
    "reasoning_effort": _TemplateText,
    # Kimi: how hard to think.
    "thinking_effort": _TemplateText,
    # MiniMax: "enabled" / "disabled".
    "thinking_mode": _TemplateText,
    # Seed-OSS: a token budget for thinking (-1: unlimited).
    "thinking_budget": _TemplateInt,
    # Gemma and Qwen3.5: keep earlier turns' reasoning in the prompt.
    "preserve_thinking": bool,
    # Llama 3.1+: tool definitions in the first user message instead of the system prompt.
    "tools_in_user_message": bool,
    # Llama 3.1+: the date the system prompt states.
    "date_string": _TemplateText,
    # gpt-oss: the identity line of its system message.
    "model_identity": _TemplateText,
    # Qwen2-VL / Qwen2.5-VL: number the pictures.
    "add_vision_id": bool,
}

# Unknown keys are refused (`forbid_unknown_fields`), naming `chat_template_kwargs.<key>`.
ChatTemplateKwargs = msgspec.defstruct(
    "ChatTemplateKwargs",
    [(name, kind | msgspec.UnsetType, msgspec.UNSET) for name, kind in TEMPLATE_KWARGS.items()],
    frozen=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
    module=__name__,
)


def template_kwargs(value: Any) -> dict[str, Any] | None:
    """A decoded ChatTemplateKwargs as the plain mapping the chat template gets (None: nothing set)."""
    if value is None:
        return None
    out = {k: v for k, v in msgspec.structs.asdict(value).items() if v is not msgspec.UNSET}
    return out or None


# ---- explicit checks ----------------------------------------------------------------------


class LimitExceeded(Exception):
    """A request over one of the bounds: a 400 naming `param`.

    Not a ValueError on purpose: raised in a struct's `__post_init__`, it passes through
    msgspec unchanged, so the field it names survives decoding.
    """

    def __init__(self, message: str, *, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def utf8_bytes(texts: Iterable[str | None]) -> int:
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts if t)


def check_conversation(texts: Iterable[str | None], *, param: str) -> None:
    size = utf8_bytes(texts)
    if size > MAX_CONVERSATION_BYTES:
        raise LimitExceeded(
            f"Invalid value for '{param}': the conversation holds {size} bytes of text; "
            f"at most {MAX_CONVERSATION_BYTES} are accepted.",
            param=param,
        )


def json_depth(value: Any) -> int:
    """Levels of objects and arrays in a decoded JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth  # deep enough to refuse: no need to walk the rest
        stack.extend((child, depth) for child in children)
    return deepest


def check_depth(value: Any, *, param: str) -> None:
    if json_depth(value) > MAX_JSON_DEPTH:
        raise LimitExceeded(
            f"Invalid value for '{param}': JSON nested more than {MAX_JSON_DEPTH} levels deep.", param=param
        )


def check_size(value: Any, *, param: str, max_bytes: int) -> int:
    """The size of `value` as JSON, refused over `max_bytes`."""
    size = len(msgspec.json.encode(value))
    if size > max_bytes:
        raise LimitExceeded(
            f"Invalid value for '{param}': {size} bytes of JSON; at most {max_bytes} are accepted.", param=param
        )
    return size


def check_schema(schema: Any, *, param: str) -> None:
    """A response_format / text.format JSON schema."""
    check_depth(schema, param=param)
    check_size(schema, param=param, max_bytes=MAX_SCHEMA_BYTES)
    check_schema_width(schema, param=param)


def check_schema_width(schema: Any, *, param: str) -> None:
    """No object of the schema declares more (pattern) properties than constrained decoding can carry."""
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, limit in (("properties", MAX_SCHEMA_PROPERTIES), ("patternProperties", MAX_SCHEMA_PATTERN_PROPERTIES)):
            declared = node.get(key)
            if isinstance(declared, dict) and len(declared) > limit:
                raise LimitExceeded(
                    f"Invalid value for '{param}': an object declares {len(declared)} {key}; "
                    f"constrained output supports at most {limit} per object.",
                    param=param,
                )
        stack.extend(node.values())


def check_tools(tools: Iterable[tuple[str, Any, str, Any]]) -> None:
    """Tools given as (param, the tool, its schema's param, its schema): each schema within MAX_JSON_DEPTH,
    each tool within MAX_TOOL_BYTES, all of them within MAX_TOOLS_BYTES."""
    total = 0
    for param, tool, schema_param, schema in tools:
        if schema is not None:
            check_depth(schema, param=schema_param)
        total += check_size(tool, param=param, max_bytes=MAX_TOOL_BYTES)
    if total > MAX_TOOLS_BYTES:
        raise LimitExceeded(
            f"Invalid value for 'tools': {total} bytes of tool definitions; at most {MAX_TOOLS_BYTES} are accepted.",
            param="tools",
        )


# ---- decode errors: which field ---------------------------------------------------------

_ERROR_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`")
_PATTERN = re.compile(r"Expected `str` matching regex '(?P<regex>.*)'")


def explain(error: msgspec.ValidationError) -> tuple[str | None, str]:
    """(the field at fault, what is wrong with it) of a msgspec validation error."""
    text = str(error)
    match = _ERROR_PATH.search(text)
    # msgspec writes a mapping's value as `[...]`: the mapping is the field.
    param = match.group("path").split("[...]")[0] if match else None
    detail = _ERROR_PATH.sub("", text)
    unknown = _UNKNOWN_FIELD.match(detail)
    if unknown is not None:
        # Only ChatTemplateKwargs forbids unknown fields: name the key, and what is accepted instead.
        param = f"{param}.{unknown.group('field')}" if param else unknown.group("field")
        detail = f"not a template variable accepted here (only {', '.join(TEMPLATE_KWARGS)})"
    pattern = _PATTERN.search(detail)
    if pattern is not None:
        detail = PATTERN_HELP.get(pattern.group("regex").encode().decode("unicode_escape"), "has a wrong format")
    return param or None, detail


# A body nested too deep for the decoder (about 1000 levels) names no field. Finding it costs a
# scan in Python on the gateway's loop (about 50 ms for this much of the worst case), so only this
# much of the body is searched; beyond it the error names no field.
_SCAN_BYTES = 256 << 10
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def deep_field(body: bytes, kind: type) -> str | None:
    """The field of `kind` under which `body` nests more than MAX_JSON_DEPTH levels (None: not found)."""
    # Each open container: [is_object, key or index, expecting a key].
    stack: list[list[Any]] = []
    for match in _TOKEN.finditer(body, 0, min(len(body), _SCAN_BYTES)):
        token = match.group()
        if token in (b"{", b"["):
            if stack:
                stack[-1][2] = False
            stack.append([token == b"{", 0 if token == b"[" else None, token == b"{"])
            if len(stack) > MAX_JSON_DEPTH + 1:
                return _field_path(kind, [level[1] for level in stack[:-1]])
        elif token in (b"}", b"]"):
            if stack:
                stack.pop()
        elif token == b",":
            if stack:
                top = stack[-1]
                if top[0]:
                    top[2] = True
                else:
                    top[1] += 1
        elif stack and stack[-1][0] and stack[-1][2]:
            stack[-1][1] = msgspec.json.decode(token)
            stack[-1][2] = False
    return None


def _field_path(kind: type, segments: list[Any]) -> str | None:
    """`segments` down to the field of `kind` the buyer can fix: the first free-form value, unknown field,
    mapping or value of the wrong shape on the way."""
    node: Any = mi.type_info(kind)
    path = ""
    for segment in segments:
        child = _child(node, segment)
        known = child is not None
        if not known and not (isinstance(segment, str) and _is_struct(node)):
            break  # a value of the wrong shape: its field is the one named so far
        path += f"[{segment}]" if isinstance(segment, int) else (f".{segment}" if path else str(segment))
        # An unknown field, a mapping (msgspec names a mapping, not its keys) or free-form JSON: stop here.
        if not known or _is_dict(child) or _free_form(child):
            break
        node = child
    return path or None


def _variants(node: Any) -> tuple[Any, ...]:
    return tuple(node.types) if isinstance(node, mi.UnionType) else (node,)


def _is_struct(node: Any) -> bool:
    return any(isinstance(v, mi.StructType) for v in _variants(node))


def _is_dict(node: Any) -> bool:
    return any(isinstance(v, mi.DictType) for v in _variants(node))


def _child(node: Any, segment: str | int) -> Any:
    for variant in _variants(node):
        if isinstance(segment, int) and isinstance(variant, mi.ListType):
            return variant.item_type
        if isinstance(segment, str) and isinstance(variant, mi.DictType):
            return variant.value_type
        if isinstance(segment, str) and isinstance(variant, mi.StructType):
            for f in variant.fields:
                if f.encode_name == segment:
                    return f.type
    return None


def _free_form(node: Any) -> bool:
    """Any JSON at all: the buyer's own structure begins here (a list of them is still ours: name the entry)."""
    return any(
        isinstance(v, mi.AnyType) or (isinstance(v, mi.DictType) and isinstance(v.value_type, mi.AnyType))
        for v in _variants(node)
    )
