"""OpenAI requests as bus requests, and bus results as OpenAI pieces.

One translation for both places that speak OpenAI: the gateway (requests for
the pool) and the daemon's local API (the Mac owner's requests). A field
with no bus meaning raises `Untranslatable`, which each side maps to its own
400 naming the field.
"""

from __future__ import annotations

from typing import Any

from schemas import bus, limits, openai

FINISH: dict[str, openai.FinishReason] = {
    "stop": "stop",
    "length": "length",
    "cancelled": "stop",
    "tool_calls": "tool_calls",
}


class Untranslatable(ValueError):
    """A request field the bus cannot carry as sent (a 400 naming `param`)."""

    def __init__(self, message: str, *, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# ---- requests ------------------------------------------------------------------------


def logit_bias(raw: dict[str, float] | None, *, param: str = "logit_bias") -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings)."""
    if not raw:
        return None
    out: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise Untranslatable(
                f"Invalid value for '{param}': keys must be token ids, got {key!r}.", param=param
            ) from None
        if token < 0:
            raise Untranslatable(f"Invalid value for '{param}': token ids are not negative, got {key!r}.", param=param)
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


def chat_message(m: openai.ChatMessage) -> bus.BusMessage:
    calls = [bus.ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in m.tool_calls or []]
    return bus.BusMessage(
        role=m.role, content=m.text(), tool_call_id=m.tool_call_id, tool_calls=calls or None, name=m.name
    )


def response_format(fmt: openai.ResponseFormat | None) -> bus.ResponseFormat | None:
    """JSON formats go to the engine, which constrains decoding to them ("text" is no constraint)."""
    if isinstance(fmt, openai.JsonObjectFormat):
        return bus.ResponseFormat(type="json_object")
    if isinstance(fmt, openai.JsonSchemaFormat):
        return bus.ResponseFormat(type="json_schema", schema=fmt.json_schema.schema)
    return None


def _sampling(req: openai.ChatCompletionRequest | openai.CompletionRequest, **differing: Any) -> bus.SamplingParams:
    """The sampling fields chat and text completions share; `differing` holds the rest."""
    return bus.SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias=logit_bias(req.logit_bias),
        stop=req.stop_list(),
        **differing,
    )


def chat_request(
    req: openai.ChatCompletionRequest, *, default_max_tokens: int, model: str | None = None, request_id: str = ""
) -> bus.InferenceRequest:
    """A chat request for the engine; `model` replaces the request's (the local API answers with its own)."""
    limit = req.token_limit()
    tools = [function_tool(t.function.name, t.function.description, t.function.parameters) for t in req.tools or []]
    choice = req.tool_choice
    return bus.InferenceRequest(
        request_id=request_id,
        model=req.model if model is None else model,
        messages=[chat_message(m) for m in req.messages],
        params=_sampling(
            req,
            max_tokens=limit or default_max_tokens,
            max_tokens_explicit=limit is not None,
            logprobs=req.logprobs,
            top_logprobs=req.top_logprobs or 0,
            response_format=response_format(req.response_format),
        ),
        tools=tools or None,
        tool_choice=(
            (named_tool_choice(choice.function.name) if isinstance(choice, openai.NamedToolChoice) else choice)
            if tools
            else None
        ),
        # Decoding kept only the allowlisted template variables (schemas/limits.py); the daemon checks again.
        chat_template_kwargs=limits.template_kwargs(req.chat_template_kwargs),
        reasoning_effort=req.reasoning_effort,
    )


def completion_request(
    req: openai.CompletionRequest, *, default_max_tokens: int, model: str | None = None, request_id: str = ""
) -> bus.InferenceRequest:
    """A legacy text completion for the engine: the prompt goes to the model as is."""
    if req.suffix:
        raise Untranslatable(
            "suffix (fill-in-the-middle) is not offered: the prompt is completed from its end only.",
            param="suffix",
            code="unsupported_value",
        )
    if req.echo and req.logprobs is not None:
        raise Untranslatable(
            "echo with logprobs would need log-probabilities of the prompt, which providers do not report.",
            param="echo",
            code="unsupported_value",
        )
    return bus.InferenceRequest(
        request_id=request_id,
        model=req.model if model is None else model,
        messages=[],
        prompt=req.prompt,
        params=_sampling(
            req,
            max_tokens=req.max_tokens or default_max_tokens,
            max_tokens_explicit=req.max_tokens is not None,
            logprobs=req.logprobs is not None,
            top_logprobs=req.logprobs or 0,
        ),
    )


# ---- results -------------------------------------------------------------------------


def completion_logprobs(items: list[bus.TokenLogprob], offset: int, *, with_top: bool) -> openai.CompletionLogprobs:
    """Legacy logprobs: parallel lists, `text_offset` counted in characters of the returned text."""
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return openai.CompletionLogprobs(
        tokens=[t.token for t in items],
        token_logprobs=[t.logprob for t in items],
        top_logprobs=[{a: lp for a, lp, _ in t.top} for t in items] if with_top else None,
        text_offset=offsets,
    )


def tool_calls(calls: list[bus.ToolCall]) -> list[openai.ToolCall]:
    return [openai.ToolCall(id=c.id, function=openai.FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def token_logprobs(items: list[bus.TokenLogprob]) -> list[openai.TokenLogprob]:
    return [
        openai.TokenLogprob(
            token=t.token,
            logprob=t.logprob,
            bytes=t.bytes,
            top_logprobs=[openai.TopLogprob(token=a, logprob=lp, bytes=b) for a, lp, b in t.top],
        )
        for t in items
    ]
