"""POST /v1/chat/completions on the local API: the same engine as the pool, OpenAI's chat format."""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, Response, post

from daemon.api.common import LocalRequests
from schemas import bus, openai, openai_bus
from schemas.openai_render import ChatRender

# When a local request sets no limit (the gateway has its own default for pool requests).
DEFAULT_CHAT_MAX_TOKENS = 1024


def _bus_request(req: openai.ChatCompletionRequest, model: str, request_id: str) -> bus.InferenceRequest:
    return openai_bus.chat_request(req, default_max_tokens=DEFAULT_CHAT_MAX_TOKENS, model=model, request_id=request_id)


def _render(req: openai.ChatCompletionRequest, request_id: str, model: str) -> ChatRender:
    usage = req.stream_options is not None and req.stream_options.include_usage
    return ChatRender(f"chatcmpl-{request_id}", int(time.time()), model, logprobs=req.logprobs, include_usage=usage)


def chat_routes(local: LocalRequests) -> list[Any]:
    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request[Any, Any, Any]) -> Response[Any]:
        return await local.serve(request, openai.ChatCompletionRequest, _bus_request, _render)

    return [chat]
