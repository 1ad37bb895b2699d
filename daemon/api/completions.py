"""POST /v1/completions on the local API: legacy text completion, the prompt sent to the model as is."""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, Response, post

from daemon.api.common import LocalRequests
from schemas import bus, openai, openai_bus
from schemas.openai_render import CompletionRender

# Seed 001's default for /v1/completions.
DEFAULT_COMPLETION_MAX_TOKENS = 100


def _bus_request(req: openai.CompletionRequest, model: str, request_id: str) -> bus.InferenceRequest:
    return openai_bus.completion_request(
        req, default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS, model=model, request_id=request_id
    )


def _render(req: openai.CompletionRequest, request_id: str, model: str) -> CompletionRender:
    return CompletionRender(
        f"cmpl-{request_id}",
        int(time.time()),
        model,
        prompt=req.prompt,
        echo=req.echo,
        logprobs=req.logprobs,
        include_usage=req.stream_options is not None and req.stream_options.include_usage,
    )


def completion_routes(local: LocalRequests) -> list[Any]:
    @post("/v1/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
        return await local.serve(request, openai.CompletionRequest, _bus_request, _render)

    return [completions]
