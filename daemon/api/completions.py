"""POST /v1/completions on the local API: legacy text completion, the prompt sent to the model as is."""

from __future__ import annotations

import secrets
import time
from typing import Any

from litestar import Request, Response, post

from daemon.api.common import LocalRequests, decode
from schemas import openai, openai_bus
from schemas.openai_render import CompletionRender

# Seed 001's default for /v1/completions.
DEFAULT_COMPLETION_MAX_TOKENS = 100


def completion_routes(local: LocalRequests) -> list[Any]:
    @post("/v1/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
        req = decode(await request.body(), openai.CompletionRequest)
        request_id = secrets.token_hex(12)
        prepared = await local.prepare(
            lambda model_id: openai_bus.completion_request(
                req, default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS, model=model_id, request_id=request_id
            )
        )
        render = CompletionRender(
            f"cmpl-{request_id}",
            int(time.time()),
            prepared.request.model,
            prompt=req.prompt,
            echo=req.echo,
            logprobs=req.logprobs,
            include_usage=req.stream_options is not None and req.stream_options.include_usage,
        )
        return await local.answer(request, prepared, render, stream=req.stream)

    return [completions]
