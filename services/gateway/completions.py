"""POST /v1/completions: legacy text completion (seed 001), the prompt sent to the model as is."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency

from schemas import bus, openai
from schemas.openai_bus import FINISH, completion_logprobs, completion_request, usage
from services.auth.bearer import Principal
from services.auth.declared import Auth, requires
from services.gateway import pipeline
from services.gateway.pipeline import Event, Finished, Job
from services.gateway.requests import decode_body
from services.gateway.sse import DONE, data
from services.openapi import GATEWAY_ERRORS, documented
from services.runtime import Runtime

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
async def completions(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[Any]:
    decoded: list[openai.CompletionRequest] = []

    async def prepare(principal: Principal, body: bytes) -> Job:
        req = decode_body(body, openai.CompletionRequest)
        decoded.append(req)
        return Job(completion_request(req, default_max_tokens=DEFAULT_MAX_TOKENS), req.stream, [req.prompt])

    started = await pipeline.start(request, runtime, event="text_completion", allow_demo=False, prepare=prepare)
    req = decoded[0]
    shape = _Shape(f"cmpl-{started.ex.request_id}", int(time.time()), req)
    if req.stream:
        return pipeline.stream(runtime, started, _Chunks(shape))
    completion = await pipeline.answer(request, runtime, started, shape.collect)
    return Response(completion, headers=started.headers)


class _Shape:
    """The id, clock, model and options every part of one completion shares."""

    def __init__(self, completion_id: str, created: int, req: openai.CompletionRequest) -> None:
        self.id = completion_id
        self.created = created
        self.req = req

    def completion(
        self,
        choices: list[openai.CompletionChoice],
        *,
        usage: openai.Usage | None = None,
        error: openai.ChunkError | None = None,
    ) -> openai.Completion:
        return openai.Completion(
            id=self.id,
            object="text_completion",
            created=self.created,
            model=self.req.model,
            choices=choices,
            usage=usage,
            error=error,
        )

    def logprobs(self, items: list[bus.TokenLogprob], offset: int) -> openai.CompletionLogprobs | None:
        if self.req.logprobs is None:
            return None
        return completion_logprobs(items, offset, with_top=bool(self.req.logprobs))

    async def collect(self, events: AsyncIterator[Event]) -> openai.Completion:
        parts = [self.req.prompt] if self.req.echo else []
        logprobs: list[bus.TokenLogprob] = []
        async for event in events:
            if not isinstance(event, Finished):
                parts.append(event.text)
                logprobs.extend(event.logprobs)
                continue
            choice = openai.CompletionChoice(
                index=0,
                text="".join(parts),
                finish_reason=FINISH[event.finish_reason],
                logprobs=self.logprobs(logprobs, 0),
            )
            return self.completion(
                [choice], usage=usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
            )
        raise AssertionError("pipeline.events always ends with Finished")


class _Chunks:
    """text_completion chunks, then `data: [DONE]`."""

    def __init__(self, shape: _Shape) -> None:
        self._shape = shape

    def _chunk(self, text: str, **extra: Any) -> bytes:
        return data(self._shape.completion([openai.CompletionChoice(index=0, text=text, **extra)]))

    async def render(self, events: AsyncIterator[Event]) -> AsyncGenerator[bytes, None]:
        shape = self._shape
        offset = 0
        if shape.req.echo:
            yield self._chunk(shape.req.prompt, finish_reason=None)
            offset = len(shape.req.prompt)
        async for event in events:
            if isinstance(event, Finished):
                yield self._chunk("", finish_reason=FINISH[event.finish_reason])
                options = shape.req.stream_options
                if options is not None and options.include_usage:
                    u = usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                    yield data(shape.completion([], usage=u))
                continue
            if event.text or event.logprobs:
                lp = shape.logprobs(event.logprobs, offset)
                offset += len(event.text)
                yield self._chunk(event.text, finish_reason=None, logprobs=lp)
        yield DONE

    def failed(self, code: str, message: str) -> list[bytes]:
        error = openai.ChunkError(message=message, type="api_error", code=code)
        choice = openai.CompletionChoice(index=0, text="", finish_reason="error")
        return [data(self._shape.completion([choice], error=error)), DONE]
