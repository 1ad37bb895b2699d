"""POST /v1/chat/completions: OpenAI's chat surface over the shared pipeline."""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, Response

from schemas import openai
from schemas.openai_bus import chat_request
from schemas.openai_render import ChatRender
from services.auth.declared import Auth, post, requires
from services.auth.principal import Principal
from services.gateway import pipeline
from services.gateway.pipeline import Job
from services.gateway.requests import decode_body
from services.openapi import GATEWAY_ERRORS, documented
from services.runtime import runtime_of


@post(
    "/v1/chat/completions",
    status_code=200,
    **documented(
        ok=openai.ChatCompletion,
        body=openai.ChatCompletionRequest,
        errors=GATEWAY_ERRORS,
        stream=True,
    ),
    **requires(Auth.API_KEY_OR_DEMO),
)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
    runtime = runtime_of(request)

    async def prepare(principal: Principal, body: bytes) -> Job[openai.ChatCompletionRequest]:
        req = decode_body(body, openai.ChatCompletionRequest)
        return Job(
            chat_request(req, default_max_tokens=runtime.settings.default_max_tokens),
            req.stream,
            [m.text() for m in req.messages],
            req,
        )

    started = await pipeline.start(request, runtime, event="chat_completion", allow_demo=True, prepare=prepare)
    req = started.job.decoded
    render = ChatRender(
        f"chatcmpl-{started.ex.request_id}",
        int(time.time()),
        req.model,
        logprobs=req.logprobs,
        include_usage=req.stream_options is not None and req.stream_options.include_usage,
    )
    return await pipeline.respond(request, runtime, started, render, render.collect)
