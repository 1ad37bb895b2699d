"""Who is calling: `Authorization: Bearer mp_...` (an API key) or `Bearer mpd_...` (a demo token).

Each route declares which it takes (services/auth/declared.py); a demo token is
accepted only where the declaration and the handler's `allow_demo` both say so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar import Request
from litestar.connection import ASGIConnection

from services.auth import demo
from services.auth.client_ip import client_ip, client_key
from services.auth.principal import Principal
from services.errors import DemoTokenNotAllowed, InvalidApiKey, MissingBearerToken
from services.keys import format as key_format

if TYPE_CHECKING:
    from services.runtime import Runtime

# Far above any real key; longer values are refused before any parsing work.
MAX_AUTHORIZATION_BYTES = 8192


def header(request: ASGIConnection[Any, Any, Any, Any], name: bytes) -> str | None:
    """A request header's first value, read from the raw list: `request.headers` decodes every header
    into a multidict, which cost more than the rest of an API key's authentication."""
    for key, value in request.scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def bearer_token(request: ASGIConnection[Any, Any, Any, Any]) -> str:
    raw = header(request, b"authorization")
    if raw is None or not raw.strip():
        raise MissingBearerToken("Missing bearer token: add the header 'Authorization: Bearer mp_...'.")
    if len(raw) > MAX_AUTHORIZATION_BYTES:
        raise InvalidApiKey("Invalid API key: the Authorization header is too long.")
    scheme, _, token = raw.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise MissingBearerToken("Missing bearer token: the Authorization header must be 'Bearer mp_...'.")
    return token.strip()


def api_key_or_bearer(request: ASGIConnection[Any, Any, Any, Any]) -> str:
    """Anthropic's SDKs send the key as `x-api-key`; `Authorization: Bearer` works as well."""
    raw = header(request, b"x-api-key")
    if raw is None or not raw.strip():
        if not (header(request, b"authorization") or "").strip():
            raise MissingBearerToken(
                "Missing API key: add the header 'x-api-key: mp_...' (or 'Authorization: Bearer mp_...')."
            )
        return bearer_token(request)
    if len(raw) > MAX_AUTHORIZATION_BYTES:
        raise InvalidApiKey("Invalid API key: the x-api-key header is too long.")
    return raw.strip()


DEMO_NOT_ALLOWED = (
    "Demo tokens work only on /v1/chat/completions, /v1/models and /v1/feedback; "
    "use an mp_ API key here (sign up at /auth/github/start)."
)
# Where a request's caller is kept once known: the route guard (services/auth/declared.py)
# authenticates it, the handler's authenticate() reads it back.
_STATE_KEY = "mp_principal"


async def _lookup(request: ASGIConnection[Any, Any, Any, Any], runtime: Runtime, *, api_key_header: bool) -> Principal:
    token = api_key_or_bearer(request) if api_key_header else bearer_token(request)
    if token.startswith(demo.PREFIX):
        claims = runtime.demo.verify(token)
        return Principal(account_id=None, key_id=None, demo_token_id=claims.token_id)
    # A key this replica has cached needs no more checks: the cache holds only keys Postgres knew.
    record = runtime.keys.cached(token)
    if record is None:
        # The checksum rejects typos and garbage (SQL, control characters) without touching the database.
        if not key_format.well_formed(token):
            raise InvalidApiKey("Invalid API key: it is not a well-formed mp_ key. Check that it was copied whole.")
        hops = runtime.settings.trusted_proxy_hops
        # Who a failed lookup counts against: worked out only on a cache miss (parsing addresses is not free).
        record = await runtime.keys.find(token, client=lambda: client_key(client_ip(request, trusted_hops=hops)))
    if record is None:
        raise InvalidApiKey("Invalid API key: unknown or revoked.")
    return Principal(account_id=record.account_id, key_id=record.key_id)


async def resolve(request: ASGIConnection[Any, Any, Any, Any], runtime: Runtime, *, api_key_header: bool) -> Principal:
    """The caller (an account's key or a demo token), looked up once per request."""
    # The scope's own dict: `request.state` wraps it in a new State object at every access.
    state = request.scope["state"]
    known: Principal | None = state.get(_STATE_KEY)
    if known is None:
        known = state[_STATE_KEY] = await _lookup(request, runtime, api_key_header=api_key_header)
    return known


async def authenticate(
    request: Request[Any, Any, Any], runtime: Runtime, *, allow_demo: bool = False, api_key_header: bool = False
) -> Principal:
    """The caller; `api_key_header` also takes the key from `x-api-key` (the Anthropic surface).

    The route's declaration has already authenticated it (the guard); a demo token
    passes only if both the declaration and this call allow it.
    """
    principal = await resolve(request, runtime, api_key_header=api_key_header)
    if principal.is_demo and not allow_demo:
        raise DemoTokenNotAllowed(DEMO_NOT_ALLOWED)
    return principal
