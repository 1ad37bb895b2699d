"""The lane (services/gateway/lane.py) answers the inference POSTs exactly as Litestar would.

One in-process control plane on the stack's Postgres and NATS (a second gateway
beside the stack's own) is called twice for each request: through Litestar's own
routing, and through the lane as `mac-provider serve` runs it. Refusals, hostile
bodies, a request while stopping and real answers from the stack's tiny model
must come back the same: status, error envelope, headers, and the same counts in
the metrics and the lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from litestar import Litestar, Request, Response, post
from litestar.middleware import DefineMiddleware

from services.app import create_app
from services.auth.declared import Auth, enforce, requires
from services.auth.declared import post as lane_post
from services.auth.demo import DemoTokens
from services.errors import exception_handler
from services.gateway.lane import LaneRefused, lane_routes
from services.lifecycle import LIFECYCLE, Lifecycle
from services.metrics.scrape import METRICS
from services.serving import served
from services.settings import Settings
from tests.support.stack import TINY_MODEL, Stack

INFERENCE = {"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"}


@pytest.fixture(scope="module")
def settings(stack: Stack) -> Settings:
    return Settings.from_env(
        {**os.environ, "MP_HOME": str(stack.home), "DATABASE_URL": stack.database_url, "NATS_URL": stack.nats_url}
    )


@contextlib.asynccontextmanager
async def _clients(settings: Settings) -> AsyncIterator[tuple[Litestar, httpx.AsyncClient, httpx.AsyncClient]]:
    """The app, a client through Litestar's routing and one through the lane as `serve` runs it."""
    app = create_app(settings)
    # httpx types an ASGI app more loosely than Litestar does.
    litestar_only: Any = app
    asgi: Any = served(app)  # what `mac-provider serve` hands uvicorn
    # Both on this loop, with the app's lifespan (its runtime) run once for them.
    async with (
        app.lifespan(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=litestar_only), base_url="http://gw.test") as plain,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://gw.test") as lane,
    ):
        # This replica serves the model once it has heard the stack's daemon.
        for _ in range(100):
            if app.state.runtime.pool.serves_model(TINY_MODEL):
                break
            await asyncio.sleep(0.1)
        yield app, plain, lane


def test_the_lane_serves_exactly_the_inference_posts(settings: Settings) -> None:
    assert set(lane_routes(create_app(settings))) == INFERENCE


def _summary(r: httpx.Response) -> dict[str, Any]:
    """What a buyer sees of an answer, without what differs between two calls (ids, times, text)."""
    try:
        body = r.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    return {
        "status": r.status_code,
        "content-type": r.headers.get("content-type"),
        "error": {k: error.get(k) for k in ("type", "code", "param")} if isinstance(error, dict) else None,
        "message": error.get("message") if isinstance(error, dict) else None,
        "body keys": sorted(body) if isinstance(body, dict) else None,
        "headers": sorted(
            h for h in r.headers if h.startswith(("x-ratelimit-", "retry-after", "allow", "request-id", "connection"))
        ),
        "has request id": bool(r.headers.get("x-request-id")),
    }


async def test_the_lane_answers_as_litestar_does(stack: Stack, settings: Settings) -> None:
    async with _clients(settings) as (app, plain, lane):
        await _answers_alike(stack, settings, app, plain, lane)


async def _answers_alike(
    stack: Stack, settings: Settings, app: Litestar, plain: httpx.AsyncClient, lane: httpx.AsyncClient
) -> None:
    demo, _ = DemoTokens(settings.secret_key, ttl_s=60).issue()
    key = {"Authorization": f"Bearer {stack.api_key}", "content-type": "application/json"}
    chat = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    cases: list[tuple[str, str, dict[str, str], bytes]] = [
        ("no key", "/v1/chat/completions", {}, json.dumps(chat).encode()),
        ("unknown key", "/v1/completions", {"Authorization": "Bearer mp_nobody"}, b"{}"),
        ("demo token where none is allowed", "/v1/responses", {"Authorization": f"Bearer {demo}"}, b"{}"),
        ("anthropic, no key", "/v1/messages", {}, b"{}"),
        ("not JSON", "/v1/chat/completions", key, b"{nope"),
        ("a bad field", "/v1/chat/completions", key, json.dumps({**chat, "temperature": "hot"}).encode()),
        ("no such model", "/v1/chat/completions", key, json.dumps({**chat, "model": "no-such-model"}).encode()),
        ("a body past the limit", "/v1/chat/completions", key, b" " * 10_000_001),
        ("anthropic, a body past the limit", "/v1/messages", key, b" " * 10_000_001),
        ("a real answer", "/v1/chat/completions", key, json.dumps(chat).encode()),
        ("a real completion", "/v1/completions", key, json.dumps({**chat, "messages": None, "prompt": "hi"}).encode()),
    ]
    for name, path, headers, body in cases:
        a = await plain.post(path, headers=headers, content=body)
        b = await lane.post(path, headers=headers, content=body)
        assert _summary(b) == _summary(a), name
        if name.startswith("a real"):
            assert b.status_code == 200, (name, b.text)
            assert b.json()["usage"]["completion_tokens"] >= 1, (name, b.text)
            # Written straight to the server (services/gateway/answer.py), with Litestar's JSON headers.
            assert b.headers["content-type"] == "application/json", name
            assert int(b.headers["content-length"]) == len(b.content), name
        elif "limit" in name:
            assert b.status_code == 413, (name, b.text)
            if path == "/v1/chat/completions":
                assert b.json()["error"]["code"] == "request_too_large", b.text

    # The same paths otherwise (another method, a trailing slash) are Litestar's either way.
    for method, path in (("GET", "/v1/chat/completions"), ("POST", "/v1/chat/completions/")):
        a = await plain.request(method, path, headers=key, content=json.dumps(chat).encode())
        b = await lane.request(method, path, headers=key, content=json.dumps(chat).encode())
        assert _summary(b) == _summary(a), (method, path)

    # A stream through the lane: events, then [DONE].
    async with lane.stream("POST", "/v1/chat/completions", headers=key, json={**chat, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join([chunk async for chunk in r.aiter_text()])
    assert text.rstrip().endswith("data: [DONE]"), text

    lifecycle: Lifecycle = app.state[LIFECYCLE]
    assert lifecycle.running == 0, "every request the lane admitted was counted out"
    # The lane's answers are counted as Litestar's are: one series, by route template and error code
    # (200: the real answers, the trailing slash's, which Litestar serves as the same route, and the stream).
    registry = app.state[METRICS].registry
    route = "/v1/chat/completions"
    assert registry.get_sample_value("mp_http_requests_total", {"route": route, "method": "POST", "status": "413"}) == 2
    assert registry.get_sample_value("mp_http_errors_total", {"route": route, "code": "request_too_large"}) == 2
    assert registry.get_sample_value("mp_http_errors_total", {"route": route, "code": "invalid_json"}) == 2
    assert registry.get_sample_value("mp_http_requests_total", {"route": route, "method": "POST", "status": "200"}) == 5


async def test_while_stopping_the_lane_refuses_as_litestar_does(stack: Stack, settings: Settings) -> None:
    async with _clients(settings) as (app, plain, lane):
        lifecycle: Lifecycle = app.state[LIFECYCLE]
        lifecycle.refusing = True
        body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        a = await plain.post("/v1/chat/completions", headers=stack.auth(), json=body)
        b = await lane.post("/v1/chat/completions", headers=stack.auth(), json=body)
        lifecycle.refusing = False
    assert _summary(b) == _summary(a)
    assert b.status_code == 503, b.text
    assert lifecycle.running == 0


async def _handler(request: Request[Any, Any, Any]) -> Response[Any]:
    return Response({})


def _app_with(**route: Any) -> Litestar:
    """An app whose one lane route has `route`'s extras, otherwise as create_app builds the gateway's."""
    path = route.pop("path", "/x")
    return Litestar(
        [lane_post(path, **requires(Auth.API_KEY), **route)(_handler)],
        guards=[enforce],
        exception_handlers={Exception: exception_handler},
    )


class _Noop:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("route", "named"),
    [
        ({"middleware": [DefineMiddleware(_Noop)]}, "middleware other than CountRequests"),
        ({"after_request": lambda response: response}, "after_request hook"),
        ({"response_headers": {"x-extra": "1"}}, "response headers"),
        ({"path": "/x/{n:int}"}, "path parameters"),
        ({"guards": [lambda connection, handler: None]}, "guards other than"),
        ({"exception_handlers": {ValueError: exception_handler}}, "exception handlers other than"),
        ({"cache": True}, "response cache"),
    ],
)
def test_the_lane_refuses_a_route_it_would_serve_differently(route: dict[str, Any], named: str) -> None:
    assert list(lane_routes(_app_with())) == ["/x"], "as the gateway's routes are, it is served"
    with pytest.raises(LaneRefused, match=named) as refused:
        lane_routes(_app_with(**route))
    assert str(refused.value).count(",") == 0, "only what was added is named"


@pytest.mark.unit
def test_a_route_of_another_kind_is_left_to_litestar() -> None:
    @post("/plain", **requires(Auth.API_KEY))
    async def plain(request: Request[Any, Any, Any]) -> Response[Any]:
        return Response({})

    assert lane_routes(Litestar([plain])) == {}


def _into(sent: list[dict[str, Any]]) -> Any:
    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return send


async def test_a_body_that_never_comes_or_trickles_is_refused_in_time(stack: Stack) -> None:
    """A client that sends its headers and then its body slowly, or never, holds a connection and a task:
    past MP_BODY_TIMEOUT_S it gets 408 body_timeout, and the connection is closed."""
    env = {"MP_HOME": str(stack.home), "DATABASE_URL": stack.database_url, "NATS_URL": stack.nats_url}
    settings = Settings.from_env({**os.environ, **env, "MP_BODY_TIMEOUT_S": "1"})
    headers = [
        (b"host", b"gw.test"),
        (b"authorization", f"Bearer {stack.api_key}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", b"1000"),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("gw.test", 80),
    }

    async def never() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def trickle() -> dict[str, Any]:
        await asyncio.sleep(0.3)
        return {"type": "http.request", "body": b" ", "more_body": True}

    async with _clients(settings) as (app, _, _):
        asgi: Any = served(app)  # called as uvicorn calls it, with plain dicts
        for receive in (never, trickle):
            sent: list[dict[str, Any]] = []
            started = time.monotonic()
            await asyncio.wait_for(asgi(dict(scope), receive, _into(sent)), 10)
            assert 0.9 <= time.monotonic() - started < 5, receive.__name__
            start, body = sent[0], sent[-1]
            assert start["status"] == 408, (receive.__name__, sent)
            assert (b"connection", b"close") in start["headers"], start["headers"]
            error = json.loads(body["body"])["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "body_timeout"), error
