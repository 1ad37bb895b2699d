"""Device login's machine side (RFC 8628): a Mac asks for a code, then polls for its provider token.

Both routes are public (the Mac has nothing yet) and speak OAuth, not the OpenAI
envelope: parameters come form-encoded (RFC 8628 §3.1, §3.4) or as JSON, and errors
are RFC 6749 §5.2's `{"error", "error_description"}` (services.errors.OAuthProblem),
because OAuth device clients read `error` to decide whether to keep polling.
"""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import parse_qsl

import msgspec
import structlog
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec

from schemas.device import (
    GRANT_TYPE,
    DeviceCode,
    DeviceCodeRequest,
    DeviceToken,
    DeviceTokenRequest,
    OAuthError,
    display_user_code,
)
from schemas.errors import ErrorEnvelope
from services.auth.client_ip import client_ip, client_key
from services.auth.declared import Auth, requires
from services.errors import OAuthProblem
from services.openapi import documented
from services.providers import device
from services.providers.device_budgets import DEVICE_BUDGETS, DeviceBudgets
from services.runtime import Runtime

log = structlog.get_logger("device_login")

T = TypeVar("T")
# A few short parameters; anything bigger is not a device client.
MAX_BODY = 8192
_FORM = "application/x-www-form-urlencoded"
_JSON = "application/json"
_NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}
# What the OpenAI envelope still answers here (Litestar's own refusals, and a crash).
_PLATFORM_ERRORS = {
    status: ResponseSpec(data_container=ErrorEnvelope, description=text, generate_examples=False)
    for status, text in ((405, "Method Not Allowed"), (413, "Request Entity Too Large"), (500, "Internal Server Error"))
}


async def _params(request: Request[Any, Any, Any], kind: type[T]) -> T:
    """The request's parameters, form-encoded or JSON, as `kind`; invalid_request naming what is wrong."""
    body = await request.body()
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: object
    if not body.strip():
        fields = {}
    elif media == _FORM:
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=32)
        except (UnicodeDecodeError, ValueError):
            raise OAuthProblem("invalid_request", "The form is not UTF-8, or has too many fields.") from None
        names = [name for name, _ in pairs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            # RFC 6749 §3.1: parameters must not be sent more than once.
            raise OAuthProblem("invalid_request", f"Parameter {repeated[0]!r} is sent more than once.")
        fields = dict(pairs)
    elif media == _JSON:
        try:
            fields = msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise OAuthProblem("invalid_request", "The body is not valid JSON.") from None
    else:
        raise OAuthProblem("invalid_request", f"Send the parameters as {_FORM} (or as JSON).")
    if not isinstance(fields, dict):
        raise OAuthProblem("invalid_request", "The parameters must be a JSON object.")
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as exc:
        raise OAuthProblem("invalid_request", f"Invalid parameters: {exc}.") from None


def _client(request: Request[Any, Any, Any], runtime: Runtime) -> str:
    return client_key(client_ip(request, trusted_hops=runtime.settings.trusted_proxy_hops))


def _rate_limited(wait: int, what: str) -> OAuthProblem:
    return OAuthProblem(
        "rate_limited", f"Too many {what} from this address; try again in {wait} s.", status=429,
        headers={"retry-after": str(wait)},
    )  # fmt: skip


@post(
    "/provider/device/code",
    status_code=200,
    request_max_body_size=MAX_BODY,
    **documented(
        ok=DeviceCode, body=DeviceCodeRequest, errors=(400, 429), error_body=OAuthError, extra=_PLATFORM_ERRORS
    ),
    **requires(Auth.PUBLIC),
)
async def device_code(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[DeviceCode]:
    """Start a device login (RFC 8628 §3.1-3.2): a device code for the Mac, a user code for its owner.

    Parameters (form-encoded or JSON, all optional): `client_id` (not checked), `name`
    (the name the Mac suggests for itself, at most 64 characters). Errors are OAuth's
    `{"error", "error_description"}` (`invalid_request`; `rate_limited` with HTTP 429 and
    Retry-After when one client asks for too many codes), not the OpenAI envelope.
    """
    settings = runtime.settings
    budgets: DeviceBudgets = request.app.state[DEVICE_BUDGETS]
    wait = budgets.codes.take(_client(request, runtime))
    if wait is not None:
        raise _rate_limited(wait, "device codes")
    params = await _params(request, DeviceCodeRequest)
    name = device.clean_mac_name(params.name)
    if name is None:
        raise OAuthProblem("invalid_request", "Invalid name: at most 64 characters, no control characters.")
    started = await device.start(
        runtime.db, ttl_s=settings.device_code_ttl_s, interval_s=settings.device_poll_interval_s, requested_name=name
    )
    shown = display_user_code(started.user_code)
    verification_uri = f"{settings.public_url}/device"
    answer = DeviceCode(
        device_code=started.device_code,
        user_code=shown,
        verification_uri=verification_uri,
        verification_uri_complete=f"{verification_uri}?user_code={shown}",
        expires_in=started.expires_in,
        interval=started.interval,
    )
    return Response(answer, status_code=200, headers=_NO_STORE)


@post(
    "/provider/device/token",
    status_code=200,
    request_max_body_size=MAX_BODY,
    **documented(
        ok=DeviceToken, body=DeviceTokenRequest, errors=(400, 429), error_body=OAuthError, extra=_PLATFORM_ERRORS
    ),
    **requires(Auth.PUBLIC),
)
async def device_token(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[DeviceToken]:
    """Poll for the provider token (RFC 8628 §3.4-3.5): `grant_type` = the device_code grant, `device_code`.

    Parameters form-encoded (as RFC 8628 says) or JSON. Once the owner approved the code,
    the first poll gets `{"access_token": "mpp_…", "token_type": "Bearer", "provider_id",
    "name", "nats_url"}`, and no later one: the code is then spent.

    Deliberately NOT the OpenAI error envelope: errors are RFC 6749 §5.2 / RFC 8628 §3.5
    objects `{"error", "error_description"}` with HTTP 400, because OAuth device clients
    expect that shape: `authorization_pending` (keep polling), `slow_down` (polled sooner
    than `interval`; the interval is now 5 s longer, for this code for good, and the
    answer's `interval` says the new value), `access_denied`, `expired_token`,
    `invalid_grant` (unknown or already used code), `unsupported_grant_type`,
    `invalid_request`; and `rate_limited` (HTTP 429 + Retry-After) for a client polling
    with too many codes that match nothing.
    """
    params = await _params(request, DeviceTokenRequest)
    if params.grant_type != GRANT_TYPE:
        raise OAuthProblem("unsupported_grant_type", f"Only grant_type={GRANT_TYPE} is served here.")
    budgets: DeviceBudgets = request.app.state[DEVICE_BUDGETS]
    client = _client(request, runtime)
    # Spent before the query, given back when the code is found: an honest daemon never runs out.
    wait = budgets.unknown_codes.take(client)
    if wait is not None:
        raise _rate_limited(wait, "unknown device codes")
    result = await device.poll(runtime.db, params.device_code)
    if result.found:
        budgets.unknown_codes.give_back(client)
    outcome = result.outcome
    if outcome is device.Poll.GRANTED and result.grant is not None:
        grant = result.grant
        log.info("provider_signed_in", provider_id=grant.provider_id, account_id=grant.account_id)
        answer = DeviceToken(
            access_token=grant.token,
            provider_id=grant.provider_id,
            name=grant.name,
            nats_url=runtime.settings.public_nats_url,
        )
        return Response(answer, status_code=200, headers=_NO_STORE)
    if outcome is device.Poll.PENDING:
        raise OAuthProblem("authorization_pending", "Not approved yet.", interval=result.interval)
    if outcome is device.Poll.SLOW_DOWN:
        raise OAuthProblem(
            "slow_down", f"Polled too soon: wait {result.interval} s between polls.", interval=result.interval
        )
    if outcome is device.Poll.DENIED:
        raise OAuthProblem("access_denied", "The owner denied this sign-in.")
    if outcome is device.Poll.EXPIRED:
        raise OAuthProblem("expired_token", "The code expired before it was approved; start again.")
    raise OAuthProblem("invalid_grant", "Unknown device code, or one already exchanged.")
