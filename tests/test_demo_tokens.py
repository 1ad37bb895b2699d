"""Browser demo tokens: issued without an account, signed, short-lived, limited per client IP
across replicas, and accepted only on the routes meant for the demo."""

from __future__ import annotations

import base64
import ipaddress
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from litestar import Request, get
from litestar.di import NamedDependency
from litestar.testing import AsyncTestClient

from services.app import create_app
from services.auth.bearer import authenticate
from services.auth.declared import Auth, requires
from services.auth.demo import DemoTokens
from services.runtime import Runtime
from services.settings import Settings
from tests.support.accounts import query
from tests.support.auth_stack import AuthStack
from tests.support.ledger import written
from tests.support.stack import TINY_MODEL

_client = httpx.Client(timeout=30)


def _unique_ip() -> str:
    # A documentation-range IPv6 address per test, so the per-IP limit starts fresh.
    return f"2001:db8::{secrets.token_hex(2)}:{secrets.token_hex(2)}"


def _issue(replica: str, ip: str) -> httpx.Response:
    return _client.post(f"{replica}/auth/demo", headers={"X-Forwarded-For": ip})


def _token(auth: AuthStack, replica: str | None = None) -> str:
    r = _issue(replica or auth.a, _unique_ip())
    assert r.status_code == 201, r.text
    token = str(r.json()["token"])
    auth.secrets_seen.append(token)
    return token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text


CHAT = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_a_demo_token_works_on_the_demo_routes_of_every_replica(auth_stack: AuthStack) -> None:
    auth = auth_stack
    r = _issue(auth.a, _unique_ip())
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    token = body["token"]
    auth.secrets_seen.append(token)
    assert token.startswith("mpd_")
    assert body["object"] == "demo_token"
    assert body["token_type"] == "bearer"
    assert 900 <= body["expires_in"] <= 901
    assert abs(body["expires_at"] - (time.time() + 900)) < 60
    assert body["allowed_routes"] == ["/v1/chat/completions", "/v1/models", "/v1/feedback"]
    for replica in (auth.b, auth.stack.base_url):  # issued by a, accepted elsewhere
        models = _client.get(f"{replica}/v1/models", headers=_bearer(token))
        assert models.status_code == 200, models.text
        assert TINY_MODEL in [m["id"] for m in models.json()["data"]]
    chat = _client.post(f"{auth.b}/v1/chat/completions", json=CHAT, headers=_bearer(token))
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 2


def test_expired_demo_tokens_are_refused(auth_stack: AuthStack) -> None:
    auth = auth_stack
    token = _token(auth, auth.short)  # lives one to two seconds
    assert _client.get(f"{auth.a}/v1/models", headers=_bearer(token)).status_code == 200
    time.sleep(2.1)
    for replica in (auth.a, auth.short):
        _error(_client.get(f"{replica}/v1/models", headers=_bearer(token)), 401, "invalid_demo_token")
        _error(
            _client.post(f"{replica}/v1/chat/completions", json=CHAT, headers=_bearer(token)), 401, "invalid_demo_token"
        )


def _tampered(token: str) -> list[str]:
    payload, signature = token.removeprefix("mpd_").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    longer = base64.urlsafe_b64encode(json.dumps({**claims, "exp": claims["exp"] + 86400}).encode()).rstrip(b"=")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    other_secret = DemoTokens(b"another deployment's secret key, 32+ chars", ttl_s=900).issue()[0]
    return [
        f"mpd_{longer.decode()}.{signature}",  # extended expiry, old signature
        f"mpd_{payload}.{flipped}",
        other_secret,  # signed by someone else
        token[:-1],
        f"mpd_{payload}",
        "mpd_",
        "mpd_" + "A" * 8000,
        "mpd_' OR '1'='1.x",
        f"mpd_{payload}.{signature}.{signature}",
    ]


def test_tampered_demo_tokens_are_refused(auth_stack: AuthStack) -> None:
    auth = auth_stack
    token = _token(auth)
    for bad in _tampered(token):
        _error(_client.get(f"{auth.b}/v1/models", headers=_bearer(bad)), 401, "invalid_demo_token")
    assert _client.get(f"{auth.b}/v1/models", headers=_bearer(token)).status_code == 200


def test_demo_tokens_are_limited_per_client_ip_across_replicas(auth_stack: AuthStack) -> None:
    auth = auth_stack  # three per IP per hour on these replicas
    ip = _unique_ip()
    for replica in (auth.a, auth.b, auth.a):
        assert _issue(replica, ip).status_code == 201
    r = _issue(auth.b, ip)
    _error(r, 429, "rate_limited")
    assert 0 < int(r.headers["retry-after"]) <= 3600
    assert _issue(auth.a, _unique_ip()).status_code == 201, "another address is not affected"

    # Concurrent requests from one address across replicas: exactly the limit gets through.
    burst_ip = _unique_ip()
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda i: _issue((auth.a, auth.b)[i % 2], burst_ip).status_code, range(24)))
    assert sorted(statuses) == [201] * 3 + [429] * 21


def test_forwarded_for_is_only_trusted_as_far_as_configured(auth_stack: AuthStack) -> None:
    auth = auth_stack  # one trusted hop: the right-most entry is the client
    ip = _unique_ip()
    for _ in range(3):
        assert (
            _client.post(f"{auth.a}/auth/demo", headers={"X-Forwarded-For": f"{_unique_ip()}, {ip}"}).status_code == 201
        )
    # Spoofing the left part does not buy more tokens.
    r = _client.post(f"{auth.a}/auth/demo", headers={"X-Forwarded-For": f"{_unique_ip()}, {ip}"})
    _error(r, 429, "rate_limited")
    # Garbage in the header falls back to the peer address rather than failing.
    for junk in ("'; DROP TABLE demo_issuance; --", "999.1.1.1", "x" * 4000, ""):
        assert _client.post(f"{auth.a}/auth/demo", headers={"X-Forwarded-For": junk}).status_code in (201, 429)


@get("/v1/key-only-probe", **requires(Auth.API_KEY))
async def key_only(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> dict[str, object]:
    # Like /v1/usage or /v1/messages: authenticate without allow_demo.
    principal = await authenticate(request, runtime)
    return {"account_id": principal.account_id, "key_id": principal.key_id}


@get("/v1/demo-probe", **requires(Auth.API_KEY_OR_DEMO))
async def demo_probe(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> dict[str, object]:
    principal = await authenticate(request, runtime, allow_demo=True)
    return {"demo_token_id": principal.demo_token_id, "key_id": principal.key_id}


async def test_demo_tokens_get_403_on_routes_that_need_a_key(auth_stack: AuthStack) -> None:
    auth = auth_stack
    token = _token(auth)
    # The real app and runtime, on the same Postgres, NATS and secret, with two probe routes.
    settings = Settings.from_env(
        {"MP_HOME": str(auth.stack.home), "DATABASE_URL": auth.stack.database_url, "NATS_URL": auth.stack.nats_url}
    )
    app = create_app(settings, ["status"])
    app.register(key_only)
    app.register(demo_probe)
    async with AsyncTestClient(app) as client:
        r = await client.get("/v1/key-only-probe", headers=_bearer(token))
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "demo_token_not_allowed"
        assert r.json()["error"]["type"] == "permission_error"
        r = await client.get("/v1/key-only-probe", headers=_bearer(token[:-1]))
        assert r.json()["error"]["code"] == "invalid_demo_token", "a broken token is invalid wherever it goes"
        r = await client.get("/v1/key-only-probe", headers=_bearer(auth.stack.api_key))
        assert r.status_code == 200
        assert r.json()["key_id"] is not None

        first = (await client.get("/v1/demo-probe", headers=_bearer(token))).json()
        again = (await client.get("/v1/demo-probe", headers=_bearer(token))).json()
        other = (await client.get("/v1/demo-probe", headers=_bearer(_token(auth)))).json()
        assert first["key_id"] is None
        assert first["demo_token_id"] == again["demo_token_id"], "stable per token, for the demo quota"
        assert first["demo_token_id"] != other["demo_token_id"]


def test_a_live_token_renews_as_the_same_subject_without_spending_the_allowance(auth_stack: AuthStack) -> None:
    auth, ip = auth_stack, _unique_ip()
    # Counted under the address as the server writes it ("0a1b" is "a1b" there).
    issued = "SELECT coalesce(sum(issued), 0) AS n FROM demo_issuance WHERE client_ip = $1"
    counted = str(ipaddress.ip_address(ip))
    first = _token_from(auth, auth.a, ip)
    spent = query(auth.stack.database_url, issued, counted)[0]["n"]
    assert spent >= 1
    # An open demo page renews before expiry (on any replica): same subject, nothing spent.
    r = _client.post(f"{auth.b}/auth/demo", headers={"X-Forwarded-For": ip, **_bearer(first)})
    assert r.status_code == 201, r.text
    renewed = r.json()["token"]
    auth.secrets_seen.append(renewed)
    assert r.json()["expires_in"] > 0
    assert query(auth.stack.database_url, issued, counted)[0]["n"] == spent
    ids = []
    for token in (first, renewed):
        r = _client.post(f"{auth.a}/v1/chat/completions", json=CHAT, headers=_bearer(token))
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-request-id"])
    written(auth.stack.nats_url)
    rows = query(
        auth.stack.database_url, "SELECT DISTINCT demo_token_id FROM usage_ledger WHERE request_id = ANY($1)", ids
    )
    assert len(rows) == 1, "both requests count against the one demo subject"
    assert rows[0]["demo_token_id"]
    # A forged token renews nothing: it is an ordinary request for a new token, and spends the allowance.
    forged = first[:-1] + ("A" if first[-1] != "A" else "B")
    r = _client.post(f"{auth.a}/auth/demo", headers={"X-Forwarded-For": ip, **_bearer(forged)})
    assert r.status_code == 201, r.text
    auth.secrets_seen.append(r.json()["token"])
    assert query(auth.stack.database_url, issued, counted)[0]["n"] == spent + 1


def _token_from(auth: AuthStack, replica: str, ip: str) -> str:
    r = _issue(replica, ip)
    assert r.status_code == 201, r.text
    token = str(r.json()["token"])
    auth.secrets_seen.append(token)
    return token
