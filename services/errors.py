"""Domain exceptions and the one place that maps them to OpenAI error envelopes."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from schemas import anthropic
from schemas.device import OAuthError, OAuthErrorCode
from schemas.errors import ErrorBody, ErrorEnvelope
from schemas.openai_bus import Untranslatable

log = structlog.get_logger("services.errors")


class ApiError(Exception):
    """An error a buyer sees: HTTP status plus the OpenAI envelope fields."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        return ErrorBody(message=self.message, type=self.type, code=self.code, param=self.param)


class InvalidJson(ApiError):
    """The body is not valid JSON."""

    code = "invalid_json"


class InvalidRequest(ApiError):
    """A field has a value the API does not accept; `param` names it."""

    code = "invalid_value"


class UnsupportedValue(ApiError):
    """A well-formed request asking for something the pool does not offer (named in `param`)."""

    code = "unsupported_value"


class MissingBearerToken(ApiError):
    """No `Authorization: Bearer ...` header (or `x-api-key` on /v1/messages)."""

    status = 401
    type = "authentication_error"
    code = "missing_bearer_token"


class InvalidApiKey(ApiError):
    """The key is malformed, unknown or revoked."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class InvalidDemoToken(ApiError):
    """The demo token is malformed, tampered with or expired: get a new one (POST /auth/demo)."""

    status = 401
    type = "authentication_error"
    code = "invalid_demo_token"


class DemoTokenNotAllowed(ApiError):
    """A valid demo token on a route that needs an API key."""

    status = 403
    type = "permission_error"
    code = "demo_token_not_allowed"


class NotSignedIn(ApiError):
    """Account routes (keys) need the session cookie from GitHub sign-in."""

    status = 401
    type = "authentication_error"
    code = "not_signed_in"


class CrossOriginRefused(ApiError):
    """A state-changing request from another site's page."""

    status = 403
    type = "permission_error"
    code = "cross_origin_refused"


class RateLimited(ApiError):
    """Too many attempts from this client (sign-ins, demo tokens, failed key lookups); see `retry-after`."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class NotFound(ApiError):
    """No such route, or no such object on your account."""

    status = 404
    code = "not_found"


class MethodNotAllowed(ApiError):
    """The route exists but not with this method; `Allow` names the methods."""

    status = 405
    code = "method_not_allowed"


class CoordinatorUnavailable(ApiError):
    """No provider can serve the model right now (or this replica is not ready)."""

    status = 503
    type = "service_unavailable_error"
    code = "coordinator_unavailable"


class ShuttingDown(CoordinatorUnavailable):
    """This replica is stopping (SIGTERM): the request was not started; any other replica takes it."""


class ProviderError(ApiError):
    """The provider failed the request after accepting it."""

    status = 502
    type = "api_error"
    code = "provider_error"


class RequestTimeout(ApiError):
    """The request ran past its time limit."""

    status = 504
    type = "timeout_error"
    code = "request_timeout"


class BodyTimeout(ApiError):
    """The request body did not arrive in time (a client trickling it, or never sending it)."""

    status = 408
    code = "body_timeout"


class BodyTooLarge(ApiError):
    """The request body is larger than the route accepts (Litestar's `request_max_body_size`)."""

    status = 413
    code = "request_too_large"


class ClientDisconnected(ApiError):
    """The client hung up before its request body arrived (nobody reads the answer; nginx's 499)."""

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"


class MissingMetricsToken(ApiError):
    """/metrics without `Authorization: Bearer <MP_METRICS_TOKEN>` (services/metrics/scrape.py)."""

    status = 401
    type = "authentication_error"
    code = "missing_metrics_token"


class InvalidMetricsToken(ApiError):
    """/metrics with a token that is not the scraper's."""

    status = 401
    type = "authentication_error"
    code = "invalid_metrics_token"


class InternalError(ApiError):
    """A bug on our side; `x-request-id` helps the operator find it."""

    status = 500
    type = "api_error"
    code = "internal_error"


class OAuthProblem(Exception):
    """An error at the device login endpoints (/provider/device/*), answered in OAuth's shape.

    RFC 6749 §5.2 / RFC 8628 §3.5 `{"error", "error_description"}`, not the OpenAI
    envelope: the clients of these two routes are OAuth device clients (the daemon's
    `login`), which read `error` to decide whether to keep polling.
    """

    def __init__(
        self,
        error: OAuthErrorCode,
        description: str,
        *,
        status: int = 400,
        interval: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(description)
        self.body = OAuthError(error=error, error_description=description, interval=interval)
        self.status = status
        # RFC 6749 §5.1: token endpoint answers, errors included, are never cached.
        self.headers = {"cache-control": "no-store", "pragma": "no-cache", **(headers or {})}


_ENCODER = msgspec.json.Encoder()

# The Anthropic surface answers errors in Anthropic's shape, with the statuses its SDKs map to exceptions.
ANTHROPIC_PREFIX = "/v1/messages"
_ANTHROPIC: dict[int, tuple[anthropic.ErrorType, int]] = {
    400: ("invalid_request_error", 400),
    401: ("authentication_error", 401),
    403: ("permission_error", 403),
    404: ("not_found_error", 404),
    405: ("invalid_request_error", 405),
    408: ("timeout_error", 408),
    413: ("request_too_large", 413),
    429: ("rate_limit_error", 429),
    503: ("overloaded_error", 529),
    504: ("timeout_error", 504),
}


def error_response(error: ApiError) -> Response[bytes]:
    return Response(
        content=_ENCODER.encode(ErrorEnvelope(error=error.body())),
        status_code=error.status,
        media_type="application/json",
        headers=error.headers,
    )


def anthropic_error_response(error: ApiError, request_id: str | None) -> Response[bytes]:
    kind, status = _ANTHROPIC.get(
        error.status, ("api_error", 500) if error.status >= 500 else ("invalid_request_error", 400)
    )
    body = anthropic.ErrorResponse(error=anthropic.ErrorBody(type=kind, message=error.message))
    headers = {**error.headers, "request-id": request_id} if request_id else error.headers
    return Response(content=_ENCODER.encode(body), status_code=status, media_type="application/json", headers=headers)


def _from_http_exception(exc: HTTPException) -> ApiError:
    if isinstance(exc, NotFoundException):
        return NotFound("Not found: no such route. See GET /v1/models and the API reference.")
    if exc.status_code == 405:
        # Litestar names the route's methods in `Allow`, which RFC 9110 requires on a 405.
        return MethodNotAllowed(str(exc.detail), headers=dict(exc.headers or {}))
    if isinstance(exc, ValidationException):
        return InvalidRequest(str(exc.detail))
    if exc.status_code == 401:
        return InvalidApiKey(str(exc.detail))
    err = ApiError(str(exc.detail))
    err.status = exc.status_code
    return err


def untranslatable(exc: Untranslatable) -> ApiError:
    """A field the bus cannot carry (schemas.openai_bus): 400 naming it."""
    kind = UnsupportedValue if exc.code == UnsupportedValue.code else InvalidRequest
    return kind(exc.message, param=exc.param)


# What Postgres going away looks like to asyncpg: refused or reset connections, a server shutting down
# or starting up, a closed connection, no connection slot.
_DATABASE_OUTAGE = (
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
)


def _api_error(request: Request[Any, Any, Any], exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Untranslatable):
        return untranslatable(exc)
    if isinstance(exc, HTTPException) and exc.status_code < HTTP_500_INTERNAL_SERVER_ERROR:
        return _from_http_exception(exc)
    if isinstance(exc, _DATABASE_OUTAGE):
        # Postgres restarting or failing over (seconds): the buyer may retry, it is not our bug.
        log.warning("database_unavailable", path=request.url.path, error=type(exc).__name__)
        return CoordinatorUnavailable(
            "A database this service needs is unreachable right now; retry in a moment.", headers={"retry-after": "1"}
        )
    log.exception("unhandled_error", path=request.url.path, method=request.method)
    return InternalError("Internal error; the request id in x-request-id helps the operator.")


def oauth_error_response(problem: OAuthProblem) -> Response[bytes]:
    return Response(
        content=_ENCODER.encode(problem.body),
        status_code=problem.status,
        media_type="application/json",
        headers=problem.headers,
    )


# Where the handler leaves the code it answered with, for the metrics (services/metrics/http.py).
ERROR_CODE = "error_code"


def _note_code(request: Request[Any, Any, Any], code: str | None) -> None:
    request.scope.setdefault("state", {})[ERROR_CODE] = code


def exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    if isinstance(exc, OAuthProblem):
        _note_code(request, exc.body.error)
        return oauth_error_response(exc)
    error = _api_error(request, exc)
    _note_code(request, error.code)
    if request.url.path.startswith(ANTHROPIC_PREFIX):
        return anthropic_error_response(error, request.scope.get("state", {}).get("request_id"))
    return error_response(error)


class QuotaExhausted(ApiError):
    """A daily quota (requests or tokens) or the concurrency limit is used up; see `retry-after`."""

    status = 429
    type = "rate_limit_error"
    code = "quota_exhausted"
