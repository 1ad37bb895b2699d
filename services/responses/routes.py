"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API, key-only.

A response is stored (unless `store: false`) with the whole conversation it
answered, so `previous_response_id` continues it on any replica with one read.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from litestar import Request, Response, delete, get
from litestar.di import NamedDependency
from litestar.params import FromPath

from schemas import limits, responses
from schemas.bus import Finished
from schemas.sse import named
from services.auth.bearer import authenticate
from services.auth.declared import Auth, post, requires
from services.auth.principal import Principal
from services.errors import ApiError, InvalidRequest, NotFound
from services.gateway import pipeline
from services.gateway.pipeline import Event, Job
from services.gateway.requests import decode_body
from services.ids import request_id_of
from services.openapi import GATEWAY_ERRORS, documented
from services.responses import store
from services.responses.convert import bus_messages, bus_request, conversation, function_tools, surface_param
from services.responses.output import Output
from services.runtime import Runtime, runtime_of

log = structlog.get_logger("responses")

_LOOKUP_ERRORS = (400, 401, 403, 404, 500)


def _not_found(response_id: str, param: str | None = None) -> NotFound:
    return NotFound(f"No response {response_id!r}: unknown, expired or deleted.", param=param)


@dataclass
class _Shape:
    """What the response object repeats from its request, and how it is kept."""

    id: str
    created_at: int
    req: responses.CreateResponse
    tools: list[responses.FunctionTool]
    instructions: str | None
    items: list[responses.InputItem]
    account_id: int
    runtime: Runtime

    def response(
        self, status: responses.Status, output: list[responses.OutputItem], **extra: Any
    ) -> responses.Response:
        req = self.req
        return responses.Response(
            id=self.id,
            created_at=self.created_at,
            model=req.model,
            status=status,
            output=output,
            tools=self.tools,
            tool_choice=req.tool_choice or "auto",
            instructions=self.instructions,
            previous_response_id=req.previous_response_id,
            max_output_tokens=req.max_output_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            store=req.store,
            metadata=req.metadata or {},
            truncation=req.truncation or "disabled",
            user=req.user,
            text=responses.TextFormatOut(format=req.text.format)
            if req.text is not None and req.text.format is not None
            else responses.TextFormatOut(),
            **extra,
        )

    def final(self, output: Output, event: Finished) -> responses.Response:
        usage = responses.Usage(
            input_tokens=event.prompt_tokens,
            output_tokens=event.completion_tokens,
            total_tokens=event.prompt_tokens + event.completion_tokens,
            input_tokens_details=responses.InputTokensDetails(cached_tokens=event.cached_tokens),
            output_tokens_details=responses.OutputTokensDetails(reasoning_tokens=event.reasoning_tokens),
        )
        if event.finish_reason == "length":
            return self.response(
                "incomplete",
                output.items,
                usage=usage,
                incomplete_details=responses.IncompleteDetails(reason="max_output_tokens"),
            )
        return self.response("completed", output.items, usage=usage)

    async def keep(self, response: responses.Response) -> responses.Response:
        """Store the answer; if Postgres fails, say so in `store` rather than lose the answer."""
        if not self.req.store:
            return response
        try:
            await store.save(
                self.runtime.db, self.account_id, self.items, response, ttl_s=self.runtime.settings.response_ttl_s
            )
        except Exception:
            log.exception("response_not_stored", response_id=self.id)
            return msgspec.structs.replace(response, store=False)
        return response

    async def collect(self, events: AsyncIterator[Event]) -> responses.Response:
        output = Output()
        async for event in events:
            if isinstance(event, Finished):
                output.finish()
                return await self.keep(self.final(output, event))
            output.feed(event)
        raise AssertionError("pipeline.events always ends with Finished")


def _event(payload: msgspec.Struct) -> bytes:
    return named(str(type(payload).__struct_config__.tag), payload)


class _Events:
    """response.created … response.completed (or .incomplete); a failure is `error` then `response.failed`."""

    def __init__(self, shape: _Shape) -> None:
        self._shape = shape
        self._output = Output()

    async def render(self, events: AsyncIterator[Event]) -> AsyncGenerator[bytes, None]:
        shape, output = self._shape, self._output
        begun = shape.response("in_progress", [])
        yield _event(responses.Created(sequence_number=output.seq(), response=begun))
        yield _event(responses.InProgress(sequence_number=output.seq(), response=begun))
        async for event in events:
            if not isinstance(event, Finished):
                for e in output.feed(event):
                    yield _event(e)
                continue
            for e in output.finish():
                yield _event(e)
            final = await shape.keep(shape.final(output, event))
            done = responses.Incomplete if final.status == "incomplete" else responses.Completed
            yield _event(done(sequence_number=output.seq(), response=final))

    def failed(self, code: str, message: str) -> list[bytes]:
        output = self._output
        failed = self._shape.response("failed", output.items, error=responses.ResponseError(code=code, message=message))
        return [
            _event(responses.Error(sequence_number=output.seq(), message=message, code=code)),
            _event(responses.Failed(sequence_number=output.seq(), response=failed)),
        ]


@post(
    "/v1/responses",
    status_code=200,
    **documented(
        ok=responses.Response,
        body=responses.CreateResponse,
        errors=(*GATEWAY_ERRORS, 404),
        stream=True,
    ),
    **requires(Auth.API_KEY),
)
async def create_response(request: Request[Any, Any, Any]) -> Response[Any]:
    runtime = runtime_of(request)
    request_id = request_id_of(request)

    async def prepare(principal: Principal, body: bytes) -> Job[_Shape]:
        assert principal.account_id is not None  # key-only route
        req = decode_body(body, responses.CreateResponse)
        tools = function_tools(req.tools)
        previous = None
        if req.previous_response_id is not None:
            previous = await store.load(runtime.db, principal.account_id, req.previous_response_id)
            if previous is None:
                raise _not_found(req.previous_response_id, "previous_response_id")
        instructions, items = conversation(req, previous)
        limit = runtime.settings.response_max_bytes
        if req.store and store.encoded_size(items) > limit:
            raise InvalidRequest(
                f"The conversation is over {limit} bytes, the most a stored response keeps. "
                "Send store: false with the whole input instead of previous_response_id.",
                param="input",
            )
        messages = bus_messages(instructions, items)
        # A stored conversation plus the new input: the whole must still fit the bound.
        try:
            texts = [m.content for m in messages] + [c.arguments for m in messages for c in m.tool_calls or ()]
            limits.check_conversation(texts, param="input")
        except limits.LimitExceeded as exc:
            raise InvalidRequest(exc.message, param=exc.param) from None
        shape = _Shape(
            id=f"resp_{request_id}",
            created_at=int(time.time()),
            req=req,
            tools=tools,
            instructions=instructions,
            items=items,
            account_id=principal.account_id,
            runtime=runtime,
        )
        job = bus_request(req, messages, tools, runtime.settings.default_max_tokens)
        return Job(job, req.stream, [m.content for m in messages], shape)

    try:
        started = await pipeline.start(request, runtime, event="openai_response", allow_demo=False, prepare=prepare)
    except ApiError as exc:
        exc.param = surface_param(exc.param)
        raise
    shape = started.job.decoded
    return await pipeline.respond(request, runtime, started, _Events(shape), shape.collect)


@get(
    "/v1/responses/{response_id:str}",
    **documented(ok=responses.Response, errors=(*_LOOKUP_ERRORS, 429)),
    **requires(Auth.API_KEY),
)
async def get_response(
    request: Request[Any, Any, Any], runtime: NamedDependency[Runtime], response_id: FromPath[str]
) -> responses.Response:
    principal = await authenticate(request, runtime)
    assert principal.account_id is not None
    stored = await store.load(runtime.db, principal.account_id, response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored.response


@delete(
    "/v1/responses/{response_id:str}",
    status_code=200,
    **documented(ok=responses.Deleted, errors=(*_LOOKUP_ERRORS, 429)),
    **requires(Auth.API_KEY),
)
async def delete_response(
    request: Request[Any, Any, Any], runtime: NamedDependency[Runtime], response_id: FromPath[str]
) -> responses.Deleted:
    principal = await authenticate(request, runtime)
    assert principal.account_id is not None
    if not await store.delete(runtime.db, principal.account_id, response_id):
        raise _not_found(response_id)
    return responses.Deleted(id=response_id)
