"""Parts of OpenAI's wire format that chat and text completions share."""

from __future__ import annotations

from schemas import bus, openai

FINISH: dict[str, openai.FinishReason] = {
    "stop": "stop",
    "length": "length",
    "cancelled": "stop",
    "tool_calls": "tool_calls",
}


def usage(prompt: int, completion: int, cached: int, reasoning: int = 0) -> openai.Usage:
    return openai.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=openai.PromptTokensDetails(cached_tokens=cached),
        completion_tokens_details=openai.CompletionTokensDetails(reasoning_tokens=reasoning),
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
