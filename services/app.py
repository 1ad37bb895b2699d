"""The Litestar application factory.

Each service is a list of route handlers. `create_app` mounts the ones asked
for, so a service can run (and scale) alone in the cloud, or all of them in one
process, which is what the local stack does. They share only Postgres and NATS.
"""

from __future__ import annotations

from collections.abc import Sequence

from litestar import Litestar, Response, route
from litestar.di import Provide
from litestar.enums import HttpMethod
from litestar.handlers import HTTPRouteHandler
from litestar.types import ControllerRouterHandler

from services.auth.routes import demo_token, github_callback, github_start, logout
from services.errors import exception_handler
from services.gateway.chat import chat_completions
from services.gateway.completions import completions
from services.gateway.messages import messages
from services.keys.account_page import account, account_new_key, account_revoke
from services.keys.routes import keys_create, keys_list, keys_revoke
from services.middleware import add_request_id
from services.openapi import openapi_config
from services.responses.routes import create_response, delete_response, get_response
from services.runtime import provide_runtime, runtime_lifespan
from services.settings import Settings
from services.status.routes import health, list_models, pool_status
from services.usage.routes import feedback, usage

SERVICES: dict[str, list[ControllerRouterHandler]] = {
    "gateway": [chat_completions, completions, messages, create_response, get_response, delete_response],
    "status": [pool_status, list_models, health],
    "auth": [github_start, github_callback, logout, demo_token],
    "keys": [keys_list, keys_create, keys_revoke, account, account_new_key, account_revoke],
    "usage": [usage, feedback],
}


def _options(path: str, methods: set[str]) -> HTTPRouteHandler:
    allow = ", ".join(sorted({*methods, "OPTIONS"}))

    @route(path, http_method=[HttpMethod.OPTIONS], include_in_schema=False, sync_to_thread=False)
    def options() -> Response[None]:
        return Response(content=None, status_code=204, headers={"allow": allow})

    return options


def _with_options(handlers: list[ControllerRouterHandler]) -> list[ControllerRouterHandler]:
    """An OPTIONS answer for each path served by several handlers, registered before them.

    Litestar makes one when the first handler of a path is registered, and its
    `Allow` keeps naming only that handler's methods after others join the path.
    """
    methods: dict[str, set[str]] = {}
    for handler in handlers:
        if isinstance(handler, HTTPRouteHandler):
            for path in handler.paths:
                methods.setdefault(path, set()).update(handler.http_methods)
    shared = [_options(path, m) for path, m in methods.items() if len(m) > 1]
    return [*shared, *handlers]


def create_app(settings: Settings, services: Sequence[str] = tuple(SERVICES)) -> Litestar:
    unknown = set(services) - set(SERVICES)
    if unknown:
        raise ValueError(f"unknown services {sorted(unknown)}; choose from {sorted(SERVICES)}")
    handlers: list[ControllerRouterHandler] = []
    for name in services:
        handlers.extend(SERVICES[name])
    if "status" not in services:
        handlers.append(health)
    return Litestar(
        route_handlers=_with_options(handlers),
        lifespan=[runtime_lifespan(settings)],  # type: ignore[list-item]
        dependencies={"runtime": Provide(provide_runtime, sync_to_thread=False)},
        exception_handlers={Exception: exception_handler},
        before_send=[add_request_id],
        openapi_config=openapi_config(),
        debug=False,
    )
