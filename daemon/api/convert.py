"""Between the OpenAI wire types and the bus request the engine runs (local API side)."""

from __future__ import annotations

from typing import Any

from schemas import bus, openai

# When a local request sets no limit (the gateway has its own default for pool requests).
DEFAULT_CHAT_MAX_TOKENS = 1024
# Seed 001's default for /v1/completions.
DEFAULT_COMPLETION_MAX_TOKENS = 100


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    if not raw:
        return None
    out: dict[int, float] = {}
    for key, value in raw.items():
        if not key.lstrip("-").isdigit():
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        out[int(key)] = value
    return out


def _message(m: openai.ChatMessage) -> bus.BusMessage:
    calls = (
        [bus.ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in m.tool_calls]
        if m.tool_calls
        else None
    )
    return bus.BusMessage(role=m.role, content=m.text(), tool_call_id=m.tool_call_id, tool_calls=calls, name=m.name)


def _response_format(fmt: openai.ResponseFormat | None) -> bus.ResponseFormat | None:
    """JSON formats are constrained by the engine (daemon/engine/structured.py); "text" is no constraint."""
    if isinstance(fmt, openai.JsonObjectFormat):
        return bus.ResponseFormat(type="json_object")
    if isinstance(fmt, openai.JsonSchemaFormat):
        return bus.ResponseFormat(type="json_schema", schema=fmt.json_schema.schema)
    return None


def chat_request(req: openai.ChatCompletionRequest, request_id: str, model_id: str) -> bus.InferenceRequest:
    limit = req.token_limit()
    tools = [_tool(t) for t in req.tools] if req.tools else None
    choice = req.tool_choice
    return bus.InferenceRequest(
        request_id=request_id,
        model=model_id,
        messages=[_message(m) for m in req.messages],
        params=bus.SamplingParams(
            max_tokens=limit or DEFAULT_CHAT_MAX_TOKENS,
            max_tokens_explicit=limit is not None,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            seed=req.seed,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=_logit_bias(req.logit_bias),
            logprobs=req.logprobs,
            top_logprobs=req.top_logprobs or 0,
            stop=req.stop_list(),
            response_format=_response_format(req.response_format),
        ),
        tools=tools,
        tool_choice=(
            {"type": "function", "function": {"name": choice.function.name}}
            if isinstance(choice, openai.NamedToolChoice)
            else choice
        ),
        chat_template_kwargs=req.chat_template_kwargs,
        reasoning_effort=req.reasoning_effort,
    )


def completion_request(req: openai.CompletionRequest, request_id: str, model_id: str) -> bus.InferenceRequest:
    return bus.InferenceRequest(
        request_id=request_id,
        model=model_id,
        messages=[],
        prompt=req.prompt,
        params=bus.SamplingParams(
            max_tokens=req.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS,
            max_tokens_explicit=req.max_tokens is not None,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            seed=req.seed,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=_logit_bias(req.logit_bias),
            logprobs=req.logprobs is not None,
            top_logprobs=req.logprobs or 0,
            stop=req.stop_list(),
        ),
    )


def _tool(tool: openai.Tool) -> dict[str, Any]:
    # Unset fields left out: chat templates test for presence, and would print "None".
    fn = tool.function
    function: dict[str, Any] = {"name": fn.name}
    if fn.description is not None:
        function["description"] = fn.description
    if fn.parameters is not None:
        function["parameters"] = fn.parameters
    return {"type": "function", "function": function}


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
