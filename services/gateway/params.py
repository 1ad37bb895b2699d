"""Pieces of a bus request that several surfaces build the same way."""

from __future__ import annotations

from typing import Any

from services.errors import InvalidRequest


def logit_bias(raw: dict[str, float] | None, *, param: str = "logit_bias") -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings)."""
    if not raw:
        return None
    out: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequest(
                f"Invalid value for '{param}': keys must be token ids, got {key!r}.", param=param
            ) from None
        if token < 0:
            raise InvalidRequest(f"Invalid value for '{param}': token ids are not negative, got {key!r}.", param=param)
        out[token] = value
    return out


def function_tool(name: str, description: str | None, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A tool as the daemon hands it to the chat template (OpenAI's function shape)."""
    # Unset fields are left out: chat templates test for presence, and would print "None".
    function: dict[str, Any] = {"name": name}
    if description is not None:
        function["description"] = description
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def named_tool_choice(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}
