"""response_format to an llguidance grammar, compiled and checked before a request is accepted.

A schema llguidance cannot enforce is the buyer's error (400 naming the
schema), found here at prepare time, before anything is queued. The worker
(daemon/worker/grammar.py) then masks every token against the grammar.
`schema` is cheap and runs on the daemon's loop; `compile_schema` can take as long as
the schema makes it (llguidance's own limits leave whole minutes: 600
`patternProperties` took 65 s), so it runs in a prepare helper process under
a time limit (daemon/engine/prepare_pool.py).

The grammar is built by schemas/json_grammar.py, which the gateway uses too to
check each provider's answer: both sides must build exactly the same one.
OpenAI's `strict` changes nothing: the schema is always enforced.
"""

from __future__ import annotations

from typing import Any

from daemon.engine.base import EngineError
from daemon.engine.prompt import tools_offered
from schemas import bus, json_grammar

SCHEMA_PARAM = "response_format.json_schema.schema"
FORMAT_PARAM = "response_format"


def schema(request: bus.InferenceRequest) -> dict[str, Any] | None:
    """The JSON schema the request's output must follow (None: unconstrained); raises EngineError."""
    fmt = request.params.response_format
    if fmt is None:
        return None
    if tools_offered(request):
        # A tool call is not JSON of the answer's schema: constraining would forbid it, not
        # constraining would break the promise. Say so instead of doing either quietly.
        raise EngineError(
            "unsupported_value",
            "response_format json_object / json_schema cannot be combined with tools: "
            "send tool_choice 'none' (or no tools) to get constrained JSON.",
            param=FORMAT_PARAM,
        )
    try:
        return json_grammar.schema_of(fmt)
    except ValueError as exc:
        raise EngineError("invalid_value", str(exc), param=SCHEMA_PARAM) from None


def param(request: bus.InferenceRequest) -> str:
    """The field a refusal of the request's format names."""
    fmt = request.params.response_format
    return SCHEMA_PARAM if fmt is not None and fmt.type == "json_schema" else FORMAT_PARAM


def compile_schema(schema: dict[str, Any]) -> str:
    """The checked llguidance grammar of a JSON schema; raises EngineError."""
    try:
        from llguidance import LLMatcher
    except ImportError as exc:
        raise EngineError(
            "unsupported_value",
            f"this provider cannot constrain output to JSON (llguidance is unavailable: {exc})",
            param=FORMAT_PARAM,
        ) from None
    try:
        compiled = json_grammar.grammar_of(schema)
    except (ValueError, TypeError, RecursionError) as exc:
        raise EngineError("invalid_value", f"the JSON schema is not usable: {exc}", param=SCHEMA_PARAM) from None
    failed, problems = LLMatcher.validate_grammar_with_warnings(compiled)
    if failed:
        raise EngineError("invalid_value", f"the JSON schema cannot be enforced: {problems[0]}", param=SCHEMA_PARAM)
    return compiled


def grammar(request: bus.InferenceRequest) -> str | None:
    """The llguidance grammar for the request's response_format (None: unconstrained), in this process."""
    wanted = schema(request)
    return compile_schema(wanted) if wanted is not None else None
