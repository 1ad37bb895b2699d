"""POST /v1/chat/completions on the local API: the same engine as the pool, OpenAI's chat format."""

from __future__ import annotations

import secrets
import time
from typing import Any

from litestar import Request, Response, post

from daemon.api.common import LocalRequests, decode
from schemas import openai, openai_bus
from schemas.openai_render import ChatRender

# When a local request sets no limit (the gateway has its own default for pool requests).
DEFAULT_CHAT_MAX_TOKENS = 1024


def chat_routes(local: LocalRequests) -> list[Any]:
    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request[Any, Any, Any]) -> Response[Any]:
        req = decode(await request.body(), openai.ChatCompletionRequest)
        request_id = secrets.token_hex(12)
        prepared = await local.prepare(
            lambda model_id: openai_bus.chat_request(
                req, default_max_tokens=DEFAULT_CHAT_MAX_TOKENS, model=model_id, request_id=request_id
            )
        )
        render = ChatRender(
            f"chatcmpl-{request_id}",
            int(time.time()),
            prepared.request.model,
            logprobs=req.logprobs,
            include_usage=req.stream_options is not None and req.stream_options.include_usage,
        )
        return await local.answer(request, prepared, render, stream=req.stream)

    return [chat]
