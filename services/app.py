"""The Litestar application factory.

Each service is a list of route handlers. `create_app` mounts the ones asked
for, so a service can run (and scale) alone in the cloud, or all of them in one
process, which is what the local stack does. They share only Postgres and NATS.

Every route declares its authentication (services/auth/declared.py); the app
refuses to build with one that does not, and its guard closes any added later.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from litestar import Litestar, Response, Router, route
from litestar.datastructures import State
from litestar.di import Provide
from litestar.enums import HttpMethod
from litestar.handlers import HTTPRouteHandler
from litestar.types import ControllerRouterHandler

from services.anthropic.routes import messages
from services.auth.declared import OPT, Auth, check_declared, enforce, requires
from services.auth.routes import GITHUB_STARTS, demo_token, github_callback, github_start, github_start_budget, logout
from services.errors import exception_handler
from services.gateway.chat import chat_completions
from services.gateway.completions import completions
from services.keys.account_page import account, account_new_key, account_revoke, account_revoke_mac
from services.keys.routes import keys_create, keys_list, keys_revoke
from services.lifecycle import LIFECYCLE, CountRequests, Lifecycle, close_when_stopping
from services.metrics.http import count_responses
from services.metrics.registry import Metrics
from services.metrics.routes import metrics as metrics_route
from services.metrics.scrape import METRICS, METRICS_TOKEN
from services.middleware import add_request_id
from services.natsauth.routes import natsauth_health
from services.natsauth.service import check_settings, open_natsauth
from services.openapi import openapi_config
from services.providers.device_budgets import DEVICE_BUDGETS, device_budgets
from services.providers.device_page import device_decide, device_form
from services.providers.device_routes import device_code, device_token
from services.providers.routes import provider_home, provider_mac, provider_macs
from services.responses.routes import create_response, delete_response, get_response
from services.runtime import provide_runtime, runtime_lifespan
from services.settings import Settings, SettingsError
from services.status.routes import health, list_models, live, pool_status, ready
from services.usage.routes import feedback, usage
from services.web.routes import demo, docs, home, status_page
from services.web.static import static_file

SERVICES: dict[str, list[ControllerRouterHandler]] = {
    "gateway": [chat_completions, completions, messages, create_response, get_response, delete_response],
    # With the web front door (services/web/): public pages that show the same pool, and their static files.
    "status": [pool_status, list_models, health, home, docs, status_page, demo, static_file],
    "auth": [github_start, github_callback, logout, demo_token],
    "keys": [keys_list, keys_create, keys_revoke, account, account_new_key, account_revoke, account_revoke_mac],
    "usage": [usage, feedback],
    # The Mac owner's side: device login (RFC 8628: the daemon's two OAuth routes and the owner's
    # /device page) and the owner's view of their Macs.
    "providers": [device_code, device_token, device_form, device_decide, provider_macs, provider_mac, provider_home],
    # The NATS auth callout (services/natsauth/): no routes, a lifespan; on when MP_NATS_ISSUER_SEED is set.
    "natsauth": [],
}


def _options(path: str, methods: set[str]) -> HTTPRouteHandler:
    allow = ", ".join(sorted({*methods, "OPTIONS"}))

    @route(
        path, http_method=[HttpMethod.OPTIONS], include_in_schema=False, sync_to_thread=False, **requires(Auth.PUBLIC)
    )
    def options() -> Response[None]:
        return Response(content=None, status_code=204, headers={"allow": allow})

    return options


def _with_options(handlers: list[ControllerRouterHandler]) -> list[ControllerRouterHandler]:
    """An OPTIONS answer for each path, registered before its handlers.

    Litestar makes one when the first handler of a path is registered, but its
    `Allow` keeps naming only that handler's methods after others join the path,
    and it declares no authentication (ours is public: it only names methods).
    """
    methods: dict[str, set[str]] = {}
    for handler in handlers:
        if isinstance(handler, HTTPRouteHandler):
            for path in handler.paths:
                methods.setdefault(path, set()).update(handler.http_methods)
    return [*(_options(path, m) for path, m in methods.items()), *handlers]


def _natsauth_lifespan(settings: Settings, metrics: Metrics) -> contextlib.AbstractAsyncContextManager[None] | object:
    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_natsauth(settings, metrics) as natsauth:
            app.state.natsauth = natsauth
            yield

    return lifespan


def create_app(settings: Settings, services: Sequence[str] = tuple(SERVICES)) -> Litestar:
    unknown = set(services) - set(SERVICES)
    if unknown:
        raise ValueError(f"unknown services {sorted(unknown)}; choose from {sorted(SERVICES)}")
    handlers: list[ControllerRouterHandler] = []
    for name in services:
        handlers.extend(SERVICES[name])
    # The callout runs where it is configured; it comes up first, since this process's own
    # NATS login (the gateway's) may be the first request it answers.
    # This app's own registry (never prometheus_client's global one), passed to whatever counts.
    metrics = Metrics()
    lifespans = [_natsauth_lifespan(settings, metrics)] if "natsauth" in services and settings.nats_issuer_seed else []
    if set(services) == {"natsauth"}:
        check_settings(settings)  # asked for alone, it must run
        handlers.append(natsauth_health)  # the callout alone: no gateway runtime to report on
    else:
        if not settings.secret_key:
            # Demo tokens and sign-in CSRF would be signed with an empty key: anyone could forge them.
            raise SettingsError(
                "MP_SECRET_KEY is not set and MP_HOME has no generated secret_key (`mac-provider serve` makes one)"
            )
        lifespans.append(runtime_lifespan(settings, metrics))
        if "status" not in services:
            handlers.append(health)
    # Every service answers its orchestrator's probes (services/lifecycle.py) and its scraper.
    handlers.extend([live, ready, metrics_route])
    lifecycle = Lifecycle.for_app(settings, set(services))
    # The API document and its page are public (their routes are Litestar's, declared through their router).
    docs = openapi_config()
    docs.openapi_router = Router(
        path="/openapi", route_handlers=[], include_in_schema=False, dto=None, return_dto=None, opt={OPT: Auth.PUBLIC}
    )
    app = Litestar(
        route_handlers=_with_options(handlers),
        lifespan=lifespans,  # type: ignore[arg-type]
        dependencies={"runtime": Provide(provide_runtime, sync_to_thread=False)},
        guards=[enforce],
        state=State(
            {
                GITHUB_STARTS: github_start_budget(settings),
                DEVICE_BUDGETS: device_budgets(settings),
                LIFECYCLE: lifecycle,
                METRICS: metrics,
                METRICS_TOKEN: settings.metrics_token.encode(),
            }
        ),
        exception_handlers={Exception: exception_handler},
        middleware=[CountRequests(lifecycle)],
        before_send=[add_request_id, close_when_stopping, count_responses(metrics)],
        openapi_config=docs,
        debug=False,
    )
    return check_declared(app)
