"""POST /v1/messages: Anthropic's Messages API over the shared pipeline.

Key-only (`x-api-key` or Bearer). Errors on this route take Anthropic's shape (services/errors.py).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response

from schemas import anthropic
from services.anthropic.convert import bus_request
from services.anthropic.output import Events, Shape
from services.auth.declared import Auth, post, requires
from services.auth.principal import Principal
from services.gateway import pipeline
from services.gateway.pipeline import Job
from services.gateway.requests import decode_body
from services.openapi import ANTHROPIC_ERRORS, documented
from services.runtime import runtime_of


@post(
    "/v1/messages",
    status_code=200,
    **documented(
        ok=anthropic.Message,
        body=anthropic.MessagesRequest,
        errors=ANTHROPIC_ERRORS,
        error_body=anthropic.ErrorResponse,
        stream=True,
    ),
    **requires(Auth.ANTHROPIC_KEY),
)
async def messages(request: Request[Any, Any, Any]) -> Response[Any]:
    runtime = runtime_of(request)

    async def prepare(principal: Principal, body: bytes) -> Job[anthropic.MessagesRequest]:
        req = decode_body(body, anthropic.MessagesRequest)
        job = bus_request(req)
        return Job(job, req.stream, [m.content for m in job.messages], req)

    started = await pipeline.start(
        request, runtime, event="anthropic_message", allow_demo=False, prepare=prepare, api_key_header=True
    )
    # Anthropic's SDKs report this header as the request id.
    started.headers["request-id"] = started.ex.request_id
    req = started.job.decoded
    shape = Shape(f"msg_{started.ex.request_id}", req.model, started.call.accepted.prompt_tokens)
    return await pipeline.respond(request, runtime, started, Events(shape), shape.collect)
