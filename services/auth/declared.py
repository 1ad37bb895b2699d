"""Every route declares who may call it; one app-wide guard enforces the declaration.

A route decorator says `**requires(Auth.API_KEY)` (Litestar's `opt`, plus the
route's OpenAPI `security`, so the document says what the guard does). The guard
(`enforce`, on the app) reads it before any dependency or body is touched:

- key kinds: the caller is authenticated here (bearer.resolve) and kept on the
  request; the handler's `authenticate()` returns it;
- `SESSION`: the session cookie must name an account (401 not_signed_in) and a
  state-changing request must come from our own origin;
- `PROVIDER_OWNER`: the session cookie or an `mp_` key (an owner), or a Mac's own
  `mpp_` token (services/auth/owner.py);
- `METRICS`: the scraper's `Bearer <MP_METRICS_TOKEN>` (services/metrics/scrape.py);
- `PUBLIC`, `SESSION_PAGE`, `GITHUB_STATE`: nothing to check here (pages answer a
  signed-out visitor themselves; the callback checks its state cookie).

A route that declares nothing is closed: `check_declared` refuses to build an app
that has one, and one registered later is answered 401 `route_closed`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import structlog
from litestar import Litestar, Request
from litestar.connection import ASGIConnection
from litestar.enums import HttpMethod
from litestar.handlers import BaseRouteHandler, HTTPRouteHandler
from litestar.routes import HTTPRoute

from services.auth import bearer
from services.auth.owner import resolve_owner
from services.auth.sessions import require_account
from services.errors import ApiError, DemoTokenNotAllowed
from services.metrics.scrape import check_token
from services.openapi import ANTHROPIC_KEY, API_KEY, SESSION
from services.runtime import runtime_of

log = structlog.get_logger("auth")

OPT = "auth"


class Auth(StrEnum):
    # Anyone: status, health, the API document, starting a sign-in, getting a demo token.
    PUBLIC = "public"
    # `Authorization: Bearer mp_...`.
    API_KEY = "api_key"
    # The same, or a demo token (`Bearer mpd_...`).
    API_KEY_OR_DEMO = "api_key_or_demo"
    # `x-api-key: mp_...` (Anthropic's SDKs) or `Authorization: Bearer mp_...`.
    ANTHROPIC_KEY = "anthropic_key"
    # The browser session cookie; without one: 401 not_signed_in.
    SESSION = "session"
    # The same cookie on HTML pages and forms; without one the page says so (or redirects) and does nothing.
    SESSION_PAGE = "session_page"
    # A provider's owner (session cookie or `Bearer mp_...`) or one Mac itself (`Bearer mpp_...`).
    PROVIDER_OWNER = "provider_owner"
    # The sign-in state cookie /auth/github/start set; the callback compares it with GitHub's `state`.
    GITHUB_STATE = "github_state"
    # A metrics scraper: `Authorization: Bearer <MP_METRICS_TOKEN>` (no key, session or demo token will do).
    METRICS = "metrics"


KEY_KINDS = frozenset({Auth.API_KEY, Auth.API_KEY_OR_DEMO, Auth.ANTHROPIC_KEY})
_SECURITY = {
    Auth.API_KEY: [API_KEY],
    Auth.API_KEY_OR_DEMO: [API_KEY],
    Auth.ANTHROPIC_KEY: [ANTHROPIC_KEY, API_KEY],
    Auth.SESSION: [SESSION],
    # Scripts and the daemon send a bearer token (`mp_` or `mpp_`); the cookie serves the owner's pages.
    Auth.PROVIDER_OWNER: [API_KEY],
}


class RouteClosed(ApiError):
    """A route that never said who may call it (a programming error): closed, not open."""

    status = 401
    type = "authentication_error"
    code = "route_closed"


def requires(kind: Auth) -> dict[str, Any]:
    """Route decorator arguments declaring its authentication (and documenting it)."""
    kwargs: dict[str, Any] = {"opt": {OPT: kind}}
    schemes = _SECURITY.get(kind)
    if schemes:
        kwargs["security"] = [{name: []} for name in schemes]
    return kwargs


def declared(handler: BaseRouteHandler) -> Auth | None:
    kind = (handler.opt or {}).get(OPT)
    return kind if isinstance(kind, Auth) else None


async def enforce(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The app-wide guard: refuse what the route's declaration does not let through."""
    kind = declared(handler)
    try:
        if kind is None or not isinstance(connection, Request):
            raise RouteClosed("This route is closed: it does not declare how callers authenticate.")
        if kind is Auth.METRICS:
            check_token(connection)
            return
        if kind is Auth.PROVIDER_OWNER:
            await resolve_owner(connection, runtime_of(connection))
            return
        if kind in KEY_KINDS or kind is Auth.SESSION:
            runtime = runtime_of(connection)
            if kind is Auth.SESSION:
                await require_account(connection, runtime.db, runtime.settings)
                return
            # Kept on the request: the handler's authenticate() returns it without another lookup.
            principal = await bearer.resolve(connection, runtime, api_key_header=kind is Auth.ANTHROPIC_KEY)
            if principal.is_demo and kind is not Auth.API_KEY_OR_DEMO:
                raise DemoTokenNotAllowed(bearer.DEMO_NOT_ALLOWED)
    except ApiError as exc:
        log.info("auth_refused", method=connection.scope.get("method"), path=connection.url.path, code=exc.code)
        raise


class LaneRoute(HTTPRouteHandler):
    """A hot route: served by services/gateway/lane.py, and its guards get the handler, not a copy.

    Litestar copies the handler for every guard call, so that a guard cannot change it. `enforce`
    only reads it, and on the inference routes that copy (41 attributes) cost as much as the rest
    of authenticating an API key.
    """

    async def authorize_connection(self, connection: ASGIConnection[Any, Any, Any, Any]) -> None:
        for guard in self.resolve_guards():
            await guard(connection, self)  # type: ignore[misc]  # as in Litestar: its guards are made async


def post(path: str, **kwargs: Any) -> HTTPRouteHandler:
    """Litestar's `@post(...)` (same arguments), for the hot routes: see `LaneRoute`."""
    return LaneRoute(path, http_method=HttpMethod.POST, **kwargs)


def undeclared(app: Litestar) -> list[str]:
    """`METHOD /path` of every registered route that declares no authentication."""
    missing = []
    for route in app.routes:
        handlers = route.route_handlers if isinstance(route, HTTPRoute) else [getattr(route, "route_handler", None)]
        for handler in handlers:
            if handler is None or declared(handler) is None:
                methods = ",".join(sorted(getattr(handler, "http_methods", None) or ["*"]))
                missing.append(f"{methods} {route.path}")
    return missing


def check_declared(app: Litestar) -> Litestar:
    """The app, or ValueError naming each route that does not declare its authentication."""
    missing = undeclared(app)
    if missing:
        raise ValueError(f"routes without an auth declaration (use services.auth.declared.requires): {missing}")
    return app
