"""The front door's pages: `/` (what this is), `/docs`, `/status` and `/demo`.

Server-rendered from the same facts the JSON routes answer with (the pool status,
the OpenAPI document, the error map, the settings); the scripts in ./static only
refresh them (status) or drive the demo chat on a demo token.
"""

from __future__ import annotations

import re

from litestar import Response, get
from litestar.di import NamedDependency

from services.auth.declared import Auth, requires
from services.auth.routes import DEMO_ROUTES
from services.openapi import HTML, documented
from services.runtime import Runtime
from services.settings import Settings
from services.status.routes import DISCLOSURES, current_status
from services.web import facts
from services.web.render import page_response

# A model id shown inside a copy-and-paste shell line must be plain: providers choose these names.
_PLAIN_MODEL = re.compile(r"^[A-Za-z0-9._:/@+-]{1,128}$")
_PAGE = documented(ok=str, media_type=HTML, errors=(500,))


def _quotas(settings: Settings) -> dict[str, dict[str, int]]:
    return {
        "account": {
            "requests": settings.quota_requests_per_day,
            "tokens": settings.quota_tokens_per_day,
            "concurrent": settings.quota_concurrent,
        },
        "demo": {
            "requests": settings.demo_quota_requests_per_day,
            "tokens": settings.demo_quota_tokens_per_day,
            "concurrent": settings.demo_quota_concurrent,
        },
    }


@get("/", **_PAGE, **requires(Auth.PUBLIC))
async def home(runtime: NamedDependency[Runtime]) -> Response[str]:
    return page_response("home.html", title="Mac Provider", status=current_status(runtime), disclosures=DISCLOSURES)


@get("/docs", **_PAGE, **requires(Auth.PUBLIC))
async def docs(runtime: NamedDependency[Runtime]) -> Response[str]:
    settings = runtime.settings
    status = current_status(runtime)
    plain = [m.id for m in status.models if _PLAIN_MODEL.match(m.id)]
    return page_response(
        "docs.html",
        title="Documentation",
        base_url=settings.public_url,
        status=status,
        quickstarts=facts.quickstarts(settings.public_url, plain[0] if plain else "MODEL"),
        routes=facts.api_routes(settings),
        errors=facts.errors(),
        quotas=_quotas(settings),
        demo_routes=DEMO_ROUTES,
        demo_ttl_s=int(settings.demo_token_ttl_s),
        request_timeout_s=int(settings.request_timeout_s),
        idle_timeout_s=int(settings.stream_idle_timeout_s),
        default_max_tokens=settings.default_max_tokens,
        disclosures=DISCLOSURES,
    )


@get("/status", **_PAGE, **requires(Auth.PUBLIC))
async def status_page(runtime: NamedDependency[Runtime]) -> Response[str]:
    return page_response("status.html", title="Pool status", status=current_status(runtime), disclosures=DISCLOSURES)


@get("/demo", **_PAGE, **requires(Auth.PUBLIC))
async def demo(runtime: NamedDependency[Runtime]) -> Response[str]:
    settings = runtime.settings
    return page_response("demo.html", title="Try it", disclosures=DISCLOSURES, quotas=_quotas(settings)["demo"])
