"""POST /v1/completions: legacy text completion (seed 001), the prompt sent to the model as is."""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, Response

from schemas import openai
from schemas.openai_bus import completion_request
from schemas.openai_render import CompletionRender
from services.auth.declared import Auth, post, requires
from services.auth.principal import Principal
from services.gateway import pipeline
from services.gateway.pipeline import Job
from services.gateway.requests import decode_body
from services.openapi import GATEWAY_ERRORS, documented
from services.runtime import runtime_of

# Seed 001's default when the request sets no max_tokens.
DEFAULT_MAX_TOKENS = 100


@post(
    "/v1/completions",
    status_code=200,
    **documented(
        ok=openai.Completion,
        body=openai.CompletionRequest,
        errors=GATEWAY_ERRORS,
        stream=True,
    ),
    **requires(Auth.API_KEY),
)
async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
    runtime = runtime_of(request)

    async def prepare(principal: Principal, body: bytes) -> Job[openai.CompletionRequest]:
        req = decode_body(body, openai.CompletionRequest)
        return Job(completion_request(req, default_max_tokens=DEFAULT_MAX_TOKENS), req.stream, [req.prompt], req)

    started = await pipeline.start(request, runtime, event="text_completion", allow_demo=False, prepare=prepare)
    req = started.job.decoded
    render = CompletionRender(
        f"cmpl-{started.ex.request_id}",
        int(time.time()),
        req.model,
        prompt=req.prompt,
        echo=req.echo,
        logprobs=req.logprobs,
        include_usage=req.stream_options is not None and req.stream_options.include_usage,
    )
    return await pipeline.respond(request, runtime, started, render, render.collect)
