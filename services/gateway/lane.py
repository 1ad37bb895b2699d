"""The inference POSTs, served without Litestar's per-request machinery.

A chat completion spends its gateway CPU in few places: auth, the quota, the
bus, the answer. Litestar's router, its two exception-handling middlewares,
the middleware stack, the signature model and the kwargs it builds for a
handler that only takes `request` cost as much again on a non-stream request
(18% of the gateway's CPU per request in `just bench hotpath`). The lane runs
the same handler, guards, middleware's bookkeeping, exception handler and
`before_send` hooks itself, for the routes declared with `declared.post`.

It serves a route only if it can serve it exactly as Litestar would: `Lane`
refuses to start when such a route gains anything it does not run (another
guard, middleware, hook, path parameter, response header or cookie, cache,
dependency in its signature, exception handler). Anything else, including
the same paths with another method, a trailing slash, a root path or a bad
`Host` header, goes to Litestar.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request
from litestar._asgi.utils import is_valid_host
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from services.auth.declared import LaneRoute, enforce
from services.errors import exception_handler
from services.lifecycle import LIFECYCLE, CountRequests, Lifecycle


class LaneRefused(ValueError):
    """A lane route uses something the lane does not run (it would be served differently)."""


class Lane:
    """The app (an ASGI app), with its `LaneRoute` POSTs answered here."""

    def __init__(self, app: Litestar) -> None:
        self.app = app
        self.routes = lane_routes(app)
        self._hooks = list(app.before_send)
        self._lifecycle: Lifecycle = app.state[LIFECYCLE]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):  # type: ignore[typeddict-item]
            handler = self.routes.get(scope["path"])
            if handler is not None and _host_ok(scope):
                await self._serve(handler, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(self, handler: LaneRoute, scope: Any, receive: Receive, send: Send) -> None:
        # What Litestar's app and router put in the scope, which Request, the hooks and the metrics read.
        scope["app"] = scope["litestar_app"] = self.app
        scope.setdefault("state", {})
        scope["path_params"] = {}
        scope["route_handler"] = handler
        scope["path_template"] = scope["path"]
        send = self._with_hooks(send, scope)
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        try:
            # CountRequests' bookkeeping: a refusal (stopping) is answered like any error.
            self._lifecycle.admit()
        except Exception as exc:
            await _error(request, exc)(scope, receive, send)
            return
        try:
            try:
                await handler.authorize_connection(request)
                answer = await handler.to_response(self.app, await handler.fn(request), request)
            except Exception as exc:
                # As Litestar's exception middleware until the answer starts; after, it cannot change it.
                answer = _error(request, exc)
            await answer(scope, receive, send)
        finally:
            self._lifecycle.done()

    def _with_hooks(self, send: Send, scope: Scope) -> Send:
        # What Litestar's app does to `send` for its `before_send` hooks (its own wrapper is private).
        hooks = self._hooks

        async def wrapped(message: Message) -> None:
            for hook in hooks:
                await hook(message, scope)
            await send(message)

        return wrapped


def _error(request: Request[Any, Any, Any], exc: Exception) -> ASGIApp:
    # Converted as Litestar's ExceptionHandlerMiddleware converts the app's exception handler's answer.
    return exception_handler(request, exc).to_asgi_response(app=None, request=request)


def _host_ok(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"host":
            return is_valid_host(value)
    return True


def lane_routes(app: Litestar) -> dict[str, LaneRoute]:
    """Path → handler of each `LaneRoute`; LaneRefused if one uses what the lane does not run."""
    routes: dict[str, LaneRoute] = {}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler, _ in route.route_handler_map.values():
            if isinstance(handler, LaneRoute):
                problems = _unsupported(handler, route)
                if problems:
                    raise LaneRefused(f"{route.path}: the lane would not run its {', '.join(problems)}")
                routes[route.path] = handler
    return routes


def _unsupported(handler: LaneRoute, route: HTTPRoute) -> list[str]:
    checks = {
        "methods other than POST": handler.http_methods != {"POST"},
        "path parameters": bool(route.path_parameters),
        "guards other than the app's declared-auth guard": handler.resolve_guards() != [enforce],
        "middleware other than CountRequests": any(
            not isinstance(m, CountRequests) for m in handler.resolve_middleware()
        ),
        "exception handlers other than the app's": (
            handler.resolve_exception_handlers() != {Exception: exception_handler}
        ),
        "before_request hook": handler.resolve_before_request() is not None,
        "after_request hook": any(getattr(layer, "after_request", None) for layer in handler.ownership_layers),
        "after_response hook": handler.resolve_after_response() is not None,
        "response headers": bool(handler.resolve_response_headers()),
        "response cookies": bool(handler.resolve_response_cookies()),
        "response cache": bool(handler.cache),
        "request class": handler.resolve_request_class() is not Request,
        "parameters other than `request`": list(handler.parsed_fn_signature.parameters) != ["request"],
        "sync function": handler.has_sync_callable,
    }
    return [name for name, bad in checks.items() if bad]
