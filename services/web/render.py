"""Jinja2 templates with autoescaping on, and the headers every page of the front door carries.

Jinja2 rather than string building: escaping is the default for every value, so a
provider-reported model name or an error message can never become markup. The
pages load only our own stylesheet and scripts (`script-src 'self'`, no inline
script, no inline style) and talk only to our own origin.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2
from litestar import Response

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    # Nothing secret on these pages, but they show live facts: always revalidate.
    "cache-control": "no-cache",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
    "content-security-policy": CSP,
}


@functools.cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("services.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def page_response(template: str, *, http_status: int = 200, **context: Any) -> Response[str]:
    return Response(
        content=render(template, **context), status_code=http_status, media_type="text/html", headers=HEADERS
    )
