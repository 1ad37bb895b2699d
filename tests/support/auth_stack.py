"""Extra gateway replicas for the sign-up, key and demo-token tests, and a browser to drive them.

Three replicas share the stack's NATS, Postgres, daemon and MP_HOME (so the
generated secret key) and one public URL, as they would behind a load balancer;
the tests choose which replica serves each step. All of them use the loopback
GitHub. Replica `b` logs its SQL statements to the Postgres log, so tests can
count the database round trips a request costs. Replica `short` issues demo
tokens and sign-in states that expire after a second.

The fixture is registered in tests/conftest.py, so all modules share one set of replicas.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from infra.components import Child, start_gateway, wait_model
from infra.ports import free_port
from tests.support.github import LoopbackGitHub, User

if TYPE_CHECKING:
    from tests.support.stack import Stack

_KEY_ON_PAGE = re.compile(r"<code(?: id=\"new-key\")?>(mp_[0-9A-Za-z]{36})</code>")
_CSRF_ON_PAGE = re.compile(r'<input type="hidden" name="csrf" value="([^"]+)">')


@dataclass
class AuthStack:
    stack: Stack
    github: LoopbackGitHub
    replicas: dict[str, str]
    children: list[Child]
    public_url: str
    # Every plaintext key, token and code the tests saw, for the secrets test.
    secrets_seen: list[str] = field(default_factory=list)

    @property
    def a(self) -> str:
        return self.replicas["a"]

    @property
    def b(self) -> str:
        return self.replicas["b"]

    @property
    def short(self) -> str:
        return self.replicas["short"]

    def browser(self) -> httpx.Client:
        # Cookies on 127.0.0.1 go to every port, as they would to one host behind a load balancer.
        return httpx.Client(follow_redirects=False, timeout=30)

    def sign_up(self, browser: httpx.Client, user: User, *, start: str | None = None, back: str | None = None) -> str:
        """The whole dance; returns the one-shot page's HTML (for a new account)."""
        self.github.sign_in(user)
        callback = self.authorize(browser, start or self.a)
        r = browser.get(self.on(back or self.a, callback))
        assert r.status_code in (200, 303), r.text
        return r.text

    def authorize(self, browser: httpx.Client, replica: str) -> str:
        """Start on `replica`, let (loopback) GitHub approve; the callback URL the browser is sent to."""
        r = browser.get(f"{replica}/auth/github/start")
        assert r.status_code == 302, r.text
        r = browser.get(r.headers["location"])
        assert r.status_code == 302, r.text
        location = r.headers["location"]
        assert location.startswith(f"{self.public_url}/auth/github/callback?")
        self.secrets_seen.append(parse_qs(urlsplit(location).query)["code"][0])
        return location

    def form(self, browser: httpx.Client, replica: str | None = None) -> dict[str, str]:
        """The hidden CSRF field the account page's forms carry for this browser's session."""
        page = browser.get(f"{replica or self.a}/account").text
        found = _CSRF_ON_PAGE.search(page)
        assert found, page
        return {"csrf": found.group(1)}

    def on(self, replica: str, url: str) -> str:
        """The same URL served by another replica (the load balancer's choice)."""
        return replica + url.removeprefix(self.public_url)

    def key_from_page(self, html: str) -> str:
        keys = _KEY_ON_PAGE.findall(html)
        assert len(set(keys)) == 1, html
        self.secrets_seen.append(keys[0])
        return str(keys[0])

    def create_key(self, browser: httpx.Client, replica: str | None = None, name: str = "") -> tuple[int, str]:
        r = browser.post(f"{replica or self.a}/account/keys", json={"name": name})
        assert r.status_code == 201, r.text
        body = r.json()
        self.secrets_seen.append(body["key"])
        return int(body["id"]), str(body["key"])


def _start(stack: Stack, name: str, port: int, env: dict[str, str]) -> Child:
    return start_gateway(
        stack.home,
        port=port,
        nats=stack.nats,
        database_url=env.pop("DATABASE_URL", stack.database_url),
        name=name,
        env=env,
    )


@pytest.fixture(scope="session")
def auth_stack(stack: Stack) -> Iterator[AuthStack]:
    ports = {"a": free_port(), "b": free_port(), "short": free_port()}
    public_url = f"http://127.0.0.1:{ports['a']}"
    github = LoopbackGitHub(callback_url=f"{public_url}/auth/github/callback")
    common = {
        **github.settings_env(),
        "MP_PUBLIC_URL": public_url,
        # Tests stand for many clients by sending X-Forwarded-For, as a load balancer would add.
        "MP_TRUSTED_PROXY_HOPS": "1",
        "MP_DEMO_TOKENS_PER_IP": "3",
        "MP_KEY_LAST_USED_FLUSH_S": "0.2",
        "MP_LOG_LEVEL": "info",
    }
    envs = {
        "a": dict(common),
        "b": {**common, "DATABASE_URL": f"{stack.database_url}?log_statement=all"},
        "short": {**common, "MP_DEMO_TOKEN_TTL_S": "1", "MP_OAUTH_STATE_TTL_S": "1"},
    }
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_start, stack, f"gateway-auth-{n}", ports[n], envs[n]) for n in ports]
    children = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            f.result()  # re-raises a replica's failure to start, after the others are stopped below
        # A new replica learns the pool from heartbeats and admission within a moment: wait for it,
        # so a test that routes through any replica does not race it.
        served = httpx.get(f"{stack.base_url}/v1/models", headers=stack.auth(), timeout=10).json()["data"]
        for port in ports.values():
            for model in served:
                wait_model(f"http://127.0.0.1:{port}", model["id"], timeout=30)
        yield AuthStack(
            stack=stack,
            github=github,
            replicas={n: f"http://127.0.0.1:{p}" for n, p in ports.items()},
            children=children,
            public_url=public_url,
        )
    finally:
        for child in children:
            child.stop()
        github.stop()
