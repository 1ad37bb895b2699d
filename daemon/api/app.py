"""The local OpenAI-compatible API (127.0.0.1): the Mac's owner uses the same engine as the pool.

`/health`, `/v1/models`, `/v1/chat/completions` (daemon/api/chat.py), `/v1/completions`
(daemon/api/completions.py). Requests run on the engine that serves NATS work, in the
same batch. The request's `model` is not used to pick a model: the loaded one answers
and its id is echoed. Behind daemon.http_guard (loopback Host, no cross-site Origin, JSON
bodies); refusals in the OpenAI envelope. No token: the owner's tools use it like a local
OpenAI server, and a web page can neither reach it (Host/Origin) nor read it (no CORS).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Litestar, Request, Response, get
from litestar.exceptions import HTTPException

from daemon import __version__
from daemon.api.chat import chat_routes
from daemon.api.common import ApiError, LocalRequests, error_response
from daemon.api.completions import completion_routes
from daemon.http_guard import LocalGuard, Refusal
from schemas import openai
from schemas.errors import ErrorBody, ErrorEnvelope

if TYPE_CHECKING:
    from daemon.runtime import Daemon


_REFUSAL_TYPES = {401: "authentication_error", 403: "permission_error"}


def _render_refusal(refusal: Refusal) -> bytes:
    kind = _REFUSAL_TYPES.get(refusal.status, "invalid_request_error")
    return msgspec.json.encode(ErrorEnvelope(error=ErrorBody(message=refusal.message, type=kind, code=refusal.code)))


def create_api_app(daemon: Daemon) -> LocalGuard:
    """The local API behind the local guard (loopback Host, no cross-site Origin, JSON bodies; no token)."""
    return LocalGuard(_api_app(daemon), render=_render_refusal, body_timeout_s=daemon.settings.body_timeout_s)


def _api_app(daemon: Daemon) -> Litestar:
    engine = daemon.engine
    local = LocalRequests(daemon)

    @get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "healthy", "version": __version__, "model": engine.model_id or None}

    @get("/v1/models")
    async def models() -> openai.ModelList:
        loaded = [engine.model_id] if engine.model_id else []
        return openai.ModelList(data=[openai.Model(id=m, created=0, owned_by="mac-provider-daemon") for m in loaded])

    def on_api_error(request: Request[Any, Any, Any], exc: ApiError) -> Response[bytes]:
        return error_response(exc)

    def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        return error_response(ApiError(exc.status_code, str(exc.detail), type="invalid_request_error", code=code))

    return Litestar(
        route_handlers=[health, models, *chat_routes(local), *completion_routes(local)],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error},
        openapi_config=None,
        logging_config=None,
    )
