"""Browser sessions after GitHub sign-in: a random token in a cookie, its hash in Postgres.

The cookie is HttpOnly and SameSite=Lax, and Secure unless the public URL is
plain-http localhost (where browsers would drop a Secure cookie); when Secure it
also takes the `__Host-` prefix, which pins it to this exact origin.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from litestar import Request
from litestar.datastructures import Cookie

from services.errors import CrossOriginRefused, NotSignedIn
from services.keys.store import Db
from services.settings import Settings

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
# The short-lived cookie that ties a sign-in's `state` to the browser that started it.
OAUTH_COOKIE = "mp_oauth_state"
OAUTH_COOKIE_PATH = "/auth/github"
# Where a request's signed-in account is kept once checked.
_ACCOUNT_KEY = "mp_account"


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def cookies_secure(settings: Settings) -> bool:
    parts = urlsplit(settings.public_url)
    return not (parts.scheme == "http" and parts.hostname in _LOCAL_HOSTS)


def session_cookie_name(settings: Settings) -> str:
    return "__Host-mp_session" if cookies_secure(settings) else "mp_session"


def make_cookie(settings: Settings, name: str, value: str, *, max_age: int, path: str = "/") -> Cookie:
    return Cookie(
        key=name,
        value=value,
        max_age=max_age,
        path=path,
        httponly=True,
        secure=cookies_secure(settings),
        samesite="lax",
    )


def session_cookie(settings: Settings, token: str) -> Cookie:
    return make_cookie(settings, session_cookie_name(settings), token, max_age=int(settings.session_ttl_s))


def cleared_session_cookie(settings: Settings) -> Cookie:
    return make_cookie(settings, session_cookie_name(settings), "", max_age=0)


async def create_session(conn: Db, account_id: int, *, ttl_s: float) -> str:
    token = secrets.token_urlsafe(32)
    await conn.execute(
        """WITH swept AS (DELETE FROM sessions WHERE expires_at < now())
           INSERT INTO sessions (token_hash, account_id, expires_at)
           VALUES ($1, $2, now() + make_interval(secs => $3::float8))""",
        _hash(token),
        account_id,
        ttl_s,
    )
    return token


async def end_session(db: asyncpg.Pool, token: str) -> None:
    await db.execute("DELETE FROM sessions WHERE token_hash = $1", _hash(token))


def session_token(request: Request[Any, Any, Any], settings: Settings) -> str | None:
    token = request.cookies.get(session_cookie_name(settings))
    # Our tokens are 43 URL-safe characters; anything else is not worth a query.
    if not token or len(token) > 64:
        return None
    return token


async def session_account(request: Request[Any, Any, Any], db: asyncpg.Pool, settings: Settings) -> int | None:
    token = session_token(request, settings)
    if token is None:
        return None
    account_id: int | None = await db.fetchval(
        "SELECT account_id FROM sessions WHERE token_hash = $1 AND expires_at > now()", _hash(token)
    )
    return account_id


def check_origin(request: Request[Any, Any, Any], settings: Settings) -> None:
    """Refuse a state-changing request sent from another site's page.

    SameSite=Lax already keeps the cookie off cross-site POSTs; this is the second
    lock. Browsers send Origin on every POST; clients that send none (curl) pass.
    """
    if request.method in {"GET", "HEAD", "OPTIONS"}:
        return
    origin = request.headers.get("origin")
    if origin is None:
        return
    public = urlsplit(settings.public_url)
    if origin.rstrip("/") != f"{public.scheme}://{public.netloc}":
        raise CrossOriginRefused("Refused: this request came from another site's page.")


async def require_account(request: Request[Any, Any, Any], db: asyncpg.Pool, settings: Settings) -> int:
    """The signed-in account, checked once per request (the route guard does it first)."""
    known: int | None = request.state.get(_ACCOUNT_KEY)
    if known is not None:
        return known
    check_origin(request, settings)
    account_id = await session_account(request, db, settings)
    if account_id is None:
        raise NotSignedIn("Not signed in: sign in with GitHub at /auth/github/start to manage your keys.")
    request.state[_ACCOUNT_KEY] = account_id
    return account_id
