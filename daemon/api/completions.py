"""POST /v1/completions on the local API: legacy text completion, the prompt sent to the model as is."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, Response, post

from daemon.api.common import (
    DONE,
    FINISH,
    LocalRequests,
    collected,
    decode,
    engine_error,
    sse,
    streamed,
    usage,
)
from daemon.engine.base import EngineError, Finished, Prepared
from schemas import bus, openai, openai_bus

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
        created = int(time.time())
        cid = f"cmpl-{request_id}"
        model = prepared.request.model
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return streamed(
                request_id, _stream(prepared, cid, created, model, include_usage=include_usage, echo=req.echo)
            )
        return await collected(request, request_id, _collect(prepared, cid, created, model, echo=req.echo))

    def _logprobs(items: list[bus.TokenLogprob], offset: int) -> openai.CompletionLogprobs:
        return openai_bus.completion_logprobs(items, offset, with_top=any(t.top for t in items))

    async def _collect(prepared: Prepared, cid: str, created: int, model: str, *, echo: bool) -> openai.Completion:
        # echo: the prompt comes back before the completion (refused with logprobs: openai_bus).
        text: list[str] = [prepared.request.prompt or ""] if echo else []
        logprobs: list[bus.TokenLogprob] = []
        finished: Finished | None = None
        try:
            async for event in local.events(prepared):
                if isinstance(event, Finished):
                    finished = event
                else:
                    text.append(event.text)
                    logprobs.extend(event.logprobs)
        except EngineError as exc:
            raise engine_error(exc) from None
        assert finished is not None
        choice = openai.CompletionChoice(
            index=0,
            text="".join(text),
            finish_reason=FINISH[finished.finish_reason],
            logprobs=_logprobs(logprobs, 0) if prepared.request.params.logprobs else None,
        )
        return openai.Completion(
            id=cid, object="text_completion", created=created, model=model, choices=[choice], usage=usage(finished)
        )

    async def _stream(
        prepared: Prepared, cid: str, created: int, model: str, *, include_usage: bool, echo: bool
    ) -> AsyncIterator[bytes]:
        def chunk(text: str, finish: openai.FinishReason | None = None, **extra: Any) -> bytes:
            choice = openai.CompletionChoice(index=0, text=text, finish_reason=finish, **extra)
            return sse(
                openai.Completion(id=cid, object="text_completion", created=created, model=model, choices=[choice])
            )

        offset = 0
        if echo and prepared.request.prompt:
            yield chunk(prepared.request.prompt)
        try:
            async for event in local.events(prepared):
                if isinstance(event, Finished):
                    yield chunk("", FINISH[event.finish_reason])
                    if include_usage:
                        yield sse(
                            openai.Completion(
                                id=cid,
                                object="text_completion",
                                created=created,
                                model=model,
                                choices=[],
                                usage=usage(event),
                            )
                        )
                    continue
                if event.text or event.logprobs:
                    lp = _logprobs(list(event.logprobs), offset) if prepared.request.params.logprobs else None
                    offset += len(event.text)
                    yield chunk(event.text, logprobs=lp)
            yield DONE
        except EngineError as exc:
            err = openai.ChunkError(message=f"Generation failed: {exc.message}", type="api_error", code=exc.code)
            yield sse({"error": err})
            yield DONE

    return [completions]
