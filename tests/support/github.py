"""A loopback GitHub: a real HTTP server speaking GitHub's OAuth web flow and `GET /user`.

- `GET /login/oauth/authorize`: checks the client id, the redirect URI (it must
  sit under the registered callback, as on GitHub) and the PKCE challenge, then
  redirects back with a single-use `code` and the `state`, as the user the test
  signed in (`sign_in`). GitHub's consent screen is taken as approved.
- `POST /login/oauth/access_token`: client credentials in the body or HTTP Basic,
  the code, the redirect URI and the PKCE `code_verifier`; answers JSON when asked
  (`Accept: application/json`), otherwise form-encoded, and like GitHub it answers
  errors with HTTP 200 and an `error` field. A code works once, for 10 minutes.
- `GET /user` with `Authorization: Bearer <token>` (or `token <token>`).

Every token request is recorded in `exchanges`, so tests can tell whether one was made.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

CODE_TTL_S = 600


@dataclass
class User:
    id: int
    login: str


@dataclass
class _Grant:
    user: User
    redirect_uri: str
    challenge: str
    issued: float


@dataclass
class Exchange:
    code: str
    outcome: str  # "ok" or GitHub's error code


@dataclass
class FakeGitHubState:
    client_id: str
    client_secret: str
    callback_url: str
    user: User | None = None
    grants: dict[str, _Grant] = field(default_factory=dict)
    tokens: dict[str, User] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    @property
    def gh(self) -> FakeGitHubState:
        return self.server.gh

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: object) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/login/oauth/authorize":
            self._authorize({k: v[0] for k, v in parse_qs(parts.query).items()})
        elif parts.path == "/user":
            self._user()
        else:
            self._json(404, {"message": "Not Found"})

    def do_POST(self) -> None:
        if urlsplit(self.path).path == "/login/oauth/access_token":
            self._access_token()
        else:
            self._json(404, {"message": "Not Found"})

    def _authorize(self, q: dict[str, str]) -> None:
        gh = self.gh
        if q.get("client_id") != gh.client_id:
            self._send(404, b"unknown client_id", "text/plain")
            return
        redirect_uri = q.get("redirect_uri", gh.callback_url)
        if not redirect_uri.startswith(gh.callback_url):
            self._send(400, b"The redirect_uri is not associated with this application.", "text/plain")
            return
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            self._send(400, b"this loopback GitHub requires PKCE S256", "text/plain")
            return
        if gh.user is None:
            self._send(401, b"no GitHub user signed in (call sign_in)", "text/plain")
            return
        code = secrets.token_hex(10)  # GitHub codes are 20 hex characters
        with gh.lock:
            gh.grants[code] = _Grant(gh.user, redirect_uri, q["code_challenge"], time.time())
        back = {"code": code, **({"state": q["state"]} if "state" in q else {})}
        sep = "&" if "?" in redirect_uri else "?"
        self._send(302, b"", "text/html", {"Location": f"{redirect_uri}{sep}{urlencode(back)}"})

    def _access_token(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
        code = form.get("code", "")
        with self.gh.lock:
            grant = self.gh.grants.pop(code, None)  # single use, whatever happens next
            outcome = self._check(client_id, client_secret, form, grant)
            self.gh.exchanges.append(Exchange(code=code, outcome=outcome))
            token = None
            if outcome == "ok":
                assert grant is not None
                token = "gho_" + secrets.token_urlsafe(27)
                self.gh.tokens[token] = grant.user
        if token is not None:
            answer = {"access_token": token, "token_type": "bearer", "scope": ""}
        else:
            answer = {
                "error": outcome,
                "error_description": "refused by the loopback GitHub",
                "error_uri": "https://docs.github.com/apps/managing-oauth-apps/troubleshooting-oauth-app-access-token-request-errors",
            }
        if "application/json" in self.headers.get("Accept", ""):
            self._json(200, answer)
        else:
            self._send(200, urlencode(answer).encode(), "application/x-www-form-urlencoded")

    def _check(
        self, client_id: str | None, client_secret: str | None, form: dict[str, str], grant: _Grant | None
    ) -> str:
        if client_id != self.gh.client_id or client_secret != self.gh.client_secret:
            return "incorrect_client_credentials"
        if grant is None or time.time() - grant.issued > CODE_TTL_S:
            return "bad_verification_code"
        if form.get("redirect_uri", grant.redirect_uri) != grant.redirect_uri:
            return "redirect_uri_mismatch"
        if _s256(form.get("code_verifier", "")) != grant.challenge:
            return "bad_verification_code"
        return "ok"

    def _user(self) -> None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        user = self.gh.tokens.get(token) if scheme.lower() in ("bearer", "token") else None
        if user is None:
            self._json(401, {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"})
            return
        self._json(200, {"login": user.login, "id": user.id, "type": "User", "name": None, "site_admin": False})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, gh: FakeGitHubState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.gh = gh


class LoopbackGitHub:
    def __init__(self, *, callback_url: str) -> None:
        self.state = FakeGitHubState(
            client_id="Iv1." + secrets.token_hex(8), client_secret=secrets.token_hex(20), callback_url=callback_url
        )
        self._server = _Server(self.state)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def settings_env(self) -> dict[str, str]:
        """What a gateway needs to use this server instead of github.com."""
        return {
            "MP_GITHUB_CLIENT_ID": self.state.client_id,
            "MP_GITHUB_CLIENT_SECRET": self.state.client_secret,
            "MP_GITHUB_AUTHORIZE_URL": f"{self.url}/login/oauth/authorize",
            "MP_GITHUB_TOKEN_URL": f"{self.url}/login/oauth/access_token",
            "MP_GITHUB_API_URL": self.url,
        }

    def sign_in(self, user: User) -> None:
        self.state.user = user

    @property
    def exchanges(self) -> list[Exchange]:
        return list(self.state.exchanges)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


_ids = itertools.count(int(time.time()) % 10_000_000 * 100)
# A buyer's key as shown once on the account page.
ANY_KEY = re.compile(r"mp_[0-9A-Za-z]{36}")


def new_user() -> User:
    """A GitHub user no test has signed in with yet."""
    n = next(_ids)
    return User(id=n, login=f"octo-{n}")
