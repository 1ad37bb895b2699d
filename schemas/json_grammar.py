"""response_format → the llguidance grammar, built one way for whoever needs it.

The daemon constrains decoding with it (daemon/engine/structured.py); the
gateway checks a provider's answer against it (services/gateway/json_check.py),
since a provider is untrusted and may send anything. Both must build exactly
the same grammar, or an honest answer would fail the check: hence one builder.

JSON comes out on one line with `, ` and `: ` between items (as Python's
json.dumps writes it): free whitespace would let a model pad the object with
blank lines until max_tokens. A schema's own "x-guidance" options, if any,
override that.
"""

from __future__ import annotations

from typing import Any

from schemas import bus

# llguidance's JsonCompileOptions (a TypedDict its stubs declare but the module does not export).
JSON_LAYOUT: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def schema_of(fmt: bus.ResponseFormat) -> dict[str, Any]:
    """The JSON Schema a format constrains to; ValueError when json_schema comes without one."""
    if fmt.type == "json_object":
        return ANY_OBJECT
    if fmt.schema is None:
        raise ValueError("json_schema needs a schema to constrain the output to")
    return fmt.schema


def grammar_of(schema: dict[str, Any]) -> str:
    """The llguidance grammar of a JSON schema (not yet validated); ValueError/TypeError when unusable."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)


def grammar(fmt: bus.ResponseFormat) -> str:
    return grammar_of(schema_of(fmt))
