"""Every route declares who may call it, and does what it declares.

The whole control plane (all services) is built in-process on the stack's
Postgres and NATS; the test walks every registered route and calls it with no
credentials, a demo token, a key nobody has and a real key, and checks each
answer against the route's declaration. A route added later without one is
refused when the app is built, and closed if registered afterwards.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import pytest
from litestar import Litestar, get
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient

from services import app as app_module
from services.app import create_app
from services.auth.declared import Auth, check_declared, declared, requires, undeclared
from services.auth.demo import DemoTokens
from services.keys import format as key_format
from services.settings import Settings
from tests.support.stack import Stack

# A value for each path parameter the routes have.
_PARAMS = {
    "key_id:int": "1",
    "token_id:int": "1",
    "response_id:str": "resp_nothing",
    "path:str": "nothing",
    "provider_id:str": "nobody",
}


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    kind: Auth


def _settings(stack: Stack) -> Settings:
    return Settings.from_env(
        {
            **os.environ,
            "MP_HOME": str(stack.home),
            "DATABASE_URL": stack.database_url,
            "NATS_URL": stack.nats_url,
            # Configured, so that starting a sign-in answers its redirect (GitHub is never called).
            "MP_GITHUB_CLIENT_ID": "route-auth-test",
            "MP_GITHUB_CLIENT_SECRET": "route-auth-test-secret",
        }
    )


def _calls(app: Litestar) -> list[Call]:
    calls: list[Call] = []
    for route in app.routes:
        assert isinstance(route, HTTPRoute), route
        path = re.sub(r"\{([^}]+)\}", lambda m: _PARAMS[m.group(1)], route.path)
        for handler in route.route_handlers:
            kind = declared(handler)
            assert kind is not None, f"{route.path} declares no authentication"
            calls.extend(Call(method, path, kind) for method in sorted(handler.http_methods))
    return calls


@pytest.fixture(scope="module")
def built(stack: Stack) -> tuple[Litestar, Settings]:
    settings = _settings(stack)
    return create_app(settings), settings


def test_every_route_of_the_whole_app_declares_a_known_kind(built: tuple[Litestar, Settings]) -> None:
    app, _ = built
    assert undeclared(app) == []
    calls = _calls(app)
    kinds = {c.kind for c in calls}
    assert kinds <= set(Auth)
    # The kinds the product has, each on the routes it should be on.
    by_route = {(c.method, c.path): c.kind for c in calls}
    assert by_route[("POST", "/v1/chat/completions")] is Auth.API_KEY_OR_DEMO
    assert by_route[("POST", "/v1/messages")] is Auth.ANTHROPIC_KEY
    assert by_route[("POST", "/v1/responses")] is Auth.API_KEY
    assert by_route[("GET", "/v1/status")] is Auth.PUBLIC
    assert by_route[("POST", "/account/keys")] is Auth.SESSION
    assert by_route[("GET", "/account")] is Auth.SESSION_PAGE
    assert by_route[("GET", "/auth/github/callback")] is Auth.GITHUB_STATE
    assert by_route[("GET", "/provider/macs")] is Auth.PROVIDER_OWNER
    assert by_route[("POST", "/provider/device/token")] is Auth.PUBLIC
    assert by_route[("GET", "/device")] is Auth.SESSION_PAGE
    assert by_route[("POST", "/account/macs/1/revoke")] is Auth.SESSION_PAGE
    assert by_route[("GET", "/metrics")] is Auth.METRICS
    assert all(kind is Auth.PUBLIC for (method, _), kind in by_route.items() if method == "OPTIONS")


def _error(r: Any) -> tuple[str | None, str | None]:
    """(type, code) of an OpenAI or Anthropic error envelope."""
    try:
        body = r.json()
    except ValueError:
        return None, None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, None
    return error.get("type"), error.get("code")


async def test_each_route_answers_as_it_declares(stack: Stack, built: tuple[Litestar, Settings]) -> None:
    app, settings = built
    demo, _ = DemoTokens(settings.secret_key, ttl_s=60).issue()
    nobody = key_format.generate()  # well formed, right checksum, in no database
    bearer = {
        "none": {},
        "demo": {"Authorization": f"Bearer {demo}"},
        "unknown": {"Authorization": f"Bearer {nobody}"},
        "key": {"Authorization": f"Bearer {stack.api_key}"},
    }
    checked: dict[Auth, int] = {}
    async with AsyncTestClient(app) as client:
        for call in _calls(app):
            answers = {
                name: await client.request(call.method, call.path, headers=headers, content=b"", follow_redirects=False)
                for name, headers in bearer.items()
            }
            where = f"{call.method} {call.path} ({call.kind})"
            statuses = {name: r.status_code for name, r in answers.items()}
            if call.kind in (Auth.API_KEY, Auth.API_KEY_OR_DEMO, Auth.ANTHROPIC_KEY):
                anthropic = call.kind is Auth.ANTHROPIC_KEY
                assert statuses["none"] == 401, where
                assert _error(answers["none"]) == (
                    ("authentication_error", None) if anthropic else ("authentication_error", "missing_bearer_token")
                ), where
                assert statuses["unknown"] == 401, where
                assert anthropic or _error(answers["unknown"])[1] == "invalid_api_key", where
                if call.kind is Auth.API_KEY_OR_DEMO:
                    assert statuses["demo"] not in (401, 403), (where, answers["demo"].text)
                else:
                    assert statuses["demo"] == 403, where
                    assert anthropic or _error(answers["demo"])[1] == "demo_token_not_allowed", where
                assert statuses["key"] not in (401, 403), (where, answers["key"].text)
            elif call.kind is Auth.SESSION:
                # A key (leaked or not) is not a session: account routes answer as if signed out.
                for name in bearer:
                    assert statuses[name] == 401, (where, name)
                    assert _error(answers[name]) == ("authentication_error", "not_signed_in"), (where, name)
            elif call.kind is Auth.PROVIDER_OWNER:
                # Signed out, an unknown key, a demo token: refused; an owner's key gets an answer.
                assert _error(answers["none"]) == ("authentication_error", "not_signed_in"), where
                assert _error(answers["unknown"])[1] == "invalid_api_key", where
                assert statuses["demo"] == 401, where
                assert statuses["key"] in (200, 404), (where, answers["key"].text)
            elif call.kind is Auth.SESSION_PAGE:
                for name in bearer:
                    r = answers[name]
                    if call.method == "GET" and r.status_code == 303:
                        # A page that needs the owner (the device page) sends the browser to sign in, and back.
                        assert r.headers["location"].startswith("/auth/github/start?next="), (where, name)
                    elif call.method == "GET":
                        assert r.status_code == 200, (where, name)
                        assert "You are not signed in" in r.text, (where, name)
                    else:
                        # A form does nothing, and goes back to its page.
                        assert r.status_code == 303, (where, name)
                        assert r.headers.get("location") in ("/account", "/device"), (where, name)
            elif call.kind is Auth.METRICS:
                # Only the scraper's token: a buyer's key or a demo token is not it.
                assert _error(answers["none"]) == ("authentication_error", "missing_metrics_token"), where
                for name in ("demo", "unknown", "key"):
                    assert _error(answers[name]) == ("authentication_error", "invalid_metrics_token"), (where, name)
                scraper = {"Authorization": f"Bearer {settings.metrics_token}"}
                r = await client.request(call.method, call.path, headers=scraper)
                assert r.status_code == 200, (where, r.text)
                assert "mp_http_requests_total" in r.text, where
            elif call.kind is Auth.GITHUB_STATE:
                assert all(s == 400 for s in statuses.values()), where
                assert "Sign-in expired" in answers["none"].text, where
            else:
                assert call.kind is Auth.PUBLIC, where
                assert all(s not in (401, 403, 500) for s in statuses.values()), (where, statuses)
            checked[call.kind] = checked.get(call.kind, 0) + 1
    assert set(checked) == set(Auth), "every kind was exercised"
    assert sum(checked.values()) >= 45


@get("/v1/forgotten", sync_to_thread=False)
def forgotten() -> dict[str, str]:
    # A handler that never checks anything: the declaration must be what protects it.
    raise AssertionError("an undeclared route ran")


@get("/v1/declared-only", sync_to_thread=False, **requires(Auth.API_KEY))
def declared_only() -> dict[str, str]:
    # Calls no authenticate(): the declaration alone keeps strangers out.
    return {"ok": "yes"}


async def test_a_route_that_declares_nothing_is_never_served(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, built: tuple[Litestar, Settings]
) -> None:
    _, settings = built
    # Added to a service: the app is not built.
    monkeypatch.setitem(app_module.SERVICES, "status", [*app_module.SERVICES["status"], forgotten])
    with pytest.raises(ValueError, match=r"GET /v1/forgotten"):
        create_app(settings, ["status"])
    monkeypatch.undo()

    # Registered on a running app: closed.
    app = create_app(settings, ["status"])
    app.register(forgotten)
    assert undeclared(app) == ["GET /v1/forgotten", "OPTIONS /v1/forgotten"]
    with pytest.raises(ValueError, match="forgotten"):
        check_declared(app)
    async with AsyncTestClient(app) as client:
        for headers in ({}, {"Authorization": f"Bearer {stack.api_key}"}):
            r = await client.get("/v1/forgotten", headers=headers)
            assert r.status_code == 401, r.text
            assert _error(r) == ("authentication_error", "route_closed")
        assert (await client.get("/v1/status")).status_code == 200, "declared routes are unaffected"

    app = create_app(settings, ["status"])
    app.register(declared_only)
    async with AsyncTestClient(app) as client:
        r = await client.get("/v1/declared-only")
        assert (r.status_code, _error(r)[1]) == (401, "missing_bearer_token")
        r = await client.get("/v1/declared-only", headers={"Authorization": f"Bearer {key_format.generate()}"})
        assert (r.status_code, _error(r)[1]) == (401, "invalid_api_key")
        r = await client.get("/v1/declared-only", headers={"Authorization": f"Bearer {stack.api_key}"})
        assert (r.status_code, r.json()) == (200, {"ok": "yes"})
