"""What the OpenAPI document says about each route, where Litestar cannot infer it.

Routes read their bodies raw (our own decoding names the bad field), answer
errors through one handler, and some stream server-sent events, so Litestar
sees neither request bodies nor error shapes nor streams. `documented()`
returns the route decorator's arguments that state them:

- the request body: a dependency whose `data` parameter has the body type.
  Litestar documents a handler's `data` from its dependencies too, but runs a
  dependency only when the handler asks for it by name, which none does;
- every status the route answers, with its body type (our error envelope, or
  Anthropic's on /v1/messages);
- `text/event-stream` beside `application/json` for routes that can stream.

The document is served at /openapi/openapi.json; /openapi points at it and at /docs (the website's reference).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from html import escape
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Litestar, Request
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin, OpenAPIRenderPlugin
from litestar.openapi.spec import Components, OpenAPIMediaType, OpenAPIType, Operation, Schema, SecurityScheme
from litestar.routes import HTTPRoute

from schemas.errors import ErrorEnvelope

API_KEY = "ApiKey"
ANTHROPIC_KEY = "AnthropicApiKey"
SESSION = "Session"

SECURITY_SCHEMES = Components(
    security_schemes={
        API_KEY: SecurityScheme(
            type="http", scheme="bearer", description="`Authorization: Bearer mp_...` (or a demo token where allowed)"
        ),
        ANTHROPIC_KEY: SecurityScheme(
            type="apiKey", name="x-api-key", security_scheme_in="header", description="`x-api-key: mp_...`"
        ),
        SESSION: SecurityScheme(
            type="apiKey", name="mp_session", security_scheme_in="cookie", description="the browser session cookie"
        ),
    }
)

# The statuses every request-taking route can answer besides its own.
GATEWAY_ERRORS = (400, 401, 403, 413, 429, 500, 502, 503, 504)
ANTHROPIC_ERRORS = (400, 401, 403, 404, 413, 429, 500, 504, 529)
_DESCRIPTIONS = {529: "Overloaded: no provider can take the request now"}
SSE = "text/event-stream"
HTML = "text/html"


def _body_doc(kind: Any) -> Provide:
    def body(data: Any) -> None:  # never called: no handler asks for this dependency
        raise AssertionError("documentation only")

    body.__annotations__ = {"data": kind, "return": None}
    return Provide(body, sync_to_thread=False)


@dataclass
class _EventStream(Operation):
    """An operation whose success answer may also be a server-sent-event stream."""

    def __post_init__(self) -> None:
        for status, response in (self.responses or {}).items():
            if status.startswith("2") and not isinstance(response, dict) and getattr(response, "content", None):
                response.content[SSE] = OpenAPIMediaType(  # type: ignore[union-attr,index]
                    schema=Schema(
                        type=OpenAPIType.STRING,
                        description="server-sent events, when the request sets `stream: true`",
                    )
                )


def documented(
    *,
    ok: Any = None,
    body: Any = None,
    status: int = 200,
    errors: Iterable[int] = (),
    error_body: Any = ErrorEnvelope,
    media_type: str = "application/json",
    stream: bool = False,
    security: Iterable[str] = (),
    ok_description: str | None = None,
    extra: dict[int, ResponseSpec] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for a route decorator: body, answers (`ok`, `errors`, `extra`), streaming, auth."""
    responses: dict[int, ResponseSpec] = {
        code: ResponseSpec(
            data_container=error_body,
            description=_DESCRIPTIONS.get(code) or HTTPStatus(code).phrase,
            generate_examples=False,
        )
        for code in errors
    }
    responses[status] = ResponseSpec(
        data_container=ok,
        description=ok_description or HTTPStatus(status).phrase,
        media_type=media_type,
        generate_examples=False,
    )
    responses.update(extra or {})
    kwargs: dict[str, Any] = {"responses": responses}
    if body is not None:
        kwargs["dependencies"] = {"documented_body": _body_doc(body)}
    if stream:
        kwargs["operation_class"] = _EventStream
    schemes = list(security)
    if schemes:
        kwargs["security"] = [{name: []} for name in schemes]
    return kwargs


def html(status: int, description: str | None = None) -> dict[int, ResponseSpec]:
    """An HTML page answered with `status` (the sign-in and account pages)."""
    return {
        status: ResponseSpec(
            data_container=str,
            description=description or HTTPStatus(status).phrase,
            media_type=HTML,
            generate_examples=False,
        )
    }


def redirect(status: int) -> dict[int, ResponseSpec]:
    return {status: ResponseSpec(data_container=None, description=HTTPStatus(status).phrase, generate_examples=False)}


def _json_targets(app: Litestar, doc: dict[str, Any]) -> list[tuple[dict[str, Any], Any]]:
    """(media type object, wire type) for every body and JSON answer a route documents."""
    targets: list[tuple[dict[str, Any], Any]] = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for method, (handler, _) in route.route_handler_map.items():
            operation = doc["paths"].get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            provider = handler.resolve_dependencies().get("documented_body")
            if provider is not None:
                body = operation["requestBody"]["content"]["application/json"]
                targets.append((body, provider.dependency.__annotations__["data"]))
            for status, spec in (handler.responses or {}).items():
                media = spec.media_type if isinstance(spec.media_type, str) else spec.media_type.value
                if spec.data_container is not None:
                    targets.append((operation["responses"][str(status)]["content"][media], spec.data_container))
    return targets


def exact_schemas(app: Litestar, doc: dict[str, Any]) -> dict[str, Any]:
    """The document with every schema generated by msgspec, the same library that decodes the requests.

    Litestar's own generation drops constraints (a minimum of 0, lengths of list
    items, dict key limits) and the `type` tags of tagged unions, so a client or a
    fuzzer trusting it would send requests we refuse. msgspec's schema is exactly
    what its decoders accept.
    """
    doc = copy.deepcopy(doc)
    targets = _json_targets(app, doc)
    schemas, components = msgspec.json.schema_components(
        [kind for _, kind in targets], ref_template="#/components/schemas/{name}"
    )
    for (media, _), schema in zip(targets, schemas, strict=True):
        media["schema"] = schema
    # Every route is documented through `documented`, so Litestar's components are no longer referenced.
    doc.setdefault("components", {})["schemas"] = components
    return doc


class ExactJsonRenderPlugin(JsonRenderPlugin):
    """Serves /openapi/openapi.json with `exact_schemas` applied (the browsable page reads it too)."""

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return self.render_json(request, exact_schemas(request.app, openapi_schema))


class DocsPointerPlugin(OpenAPIRenderPlugin):
    """/openapi: a plain page pointing at /docs and the document itself.

    Not Swagger UI: Litestar's page loads its script, style and icon from a CDN at run time, which
    an offline deployment cannot reach, and runs inline script our CSP refuses. /docs is built from
    the same document, on this site.
    """

    def __init__(self) -> None:
        super().__init__(path="/", favicon="", style="")

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        title = escape(str(openapi_schema.get("info", {}).get("title", "API")))
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<title>{title}: OpenAPI</title><link rel="stylesheet" href="/static/site.css"></head>'
            f"<body><main><h1>{title}: OpenAPI</h1>"
            '<p>The API reference (every route, its auth, quotas and errors) is at <a href="/docs">/docs</a>.</p>'
            '<p>The OpenAPI 3.1 document itself: <a href="/openapi/openapi.json">/openapi/openapi.json</a>.</p>'
            "</main></body></html>"
        ).encode()


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="Mac Provider",
        version="0.1.0",
        path="/openapi",
        components=SECURITY_SCHEMES,
        render_plugins=[ExactJsonRenderPlugin(), DocsPointerPlugin()],
    )
