"""The auth service: GitHub sign-up/sign-in, sign-out, and browser demo tokens."""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
import structlog
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.response import Redirect

from services.auth.bearer import bearer_token
from services.auth.client_ip import client_ip, client_key, net64
from services.auth.csrf import FIELD, csrf_ok
from services.auth.declared import Auth, requires
from services.auth.demo import PREFIX as DEMO_PREFIX
from services.auth.demo import DemoToken
from services.auth.demo_limit import DemoLimits, take_demo_slot
from services.auth.github import GitHubError, GitHubOAuth
from services.auth.oauth_state import open_state, take_state
from services.auth.rate_limit import TokenBuckets
from services.auth.return_path import safe_return_path
from services.auth.sessions import (
    OAUTH_COOKIE,
    OAUTH_COOKIE_PATH,
    check_origin,
    cleared_session_cookie,
    create_session,
    end_session,
    make_cookie,
    session_account,
    session_cookie,
    session_token,
)
from services.errors import ApiError, RateLimited
from services.keys.store import create_key, upsert_github_account
from services.openapi import HTML, documented, html, redirect
from services.pages import HEADERS, html_response, message_page, one_shot_key_page, stale_form
from services.runtime import Runtime
from services.settings import Settings

log = structlog.get_logger("auth")

# Codes and states from GitHub are tens of characters; longer ones are not worth a query.
_MAX_PARAM = 512
DEMO_ROUTES = ["/v1/chat/completions", "/v1/models", "/v1/feedback"]
_START_AGAIN = ("/auth/github/start", "Sign in with GitHub")
# The app state key of this replica's sign-in budget (github_start_budget, made by create_app).
GITHUB_STARTS = "github_starts"


class DemoTokenIssued(msgspec.Struct, frozen=True):
    token: str
    expires_at: int
    expires_in: int
    allowed_routes: list[str]
    token_type: str = "bearer"
    object: str = "demo_token"


def github_start_budget(settings: Settings) -> TokenBuckets:
    """Sign-ins one client may start per minute in one replica (each writes a state row)."""
    return TokenBuckets(per_minute=settings.github_start_per_min, max_clients=settings.rate_limit_clients)


@get(
    "/auth/github/start",
    status_code=302,
    **documented(status=302, errors=(429, 500), extra=html(503)),
    **requires(Auth.PUBLIC),
)
async def github_start(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[Any]:
    settings = runtime.settings
    budget: TokenBuckets = request.app.state[GITHUB_STARTS]
    wait = budget.take(client_key(client_ip(request, trusted_hops=settings.trusted_proxy_hops)))
    if wait is not None:
        raise RateLimited(
            f"Too many sign-ins started from this address; try again in {wait} s.", headers={"retry-after": str(wait)}
        )
    oauth = GitHubOAuth(settings)
    if not oauth.configured:
        text = (
            "GitHub sign-in is not configured on this deployment (MP_GITHUB_CLIENT_ID, MP_GITHUB_CLIENT_SECRET). "
            "On the local stack, use the dev key in .mp/dev.env."
        )
        return html_response(message_page("Sign-in unavailable", text), status=503)
    # Where to come back to (the device page with its code), if it is one of our pages; else nowhere.
    return_to = safe_return_path(request.query_params.get("next"))
    state, verifier = await open_state(runtime.db, ttl_s=settings.oauth_state_ttl_s, return_to=return_to)
    # The state also goes to this browser, so a callback carrying someone else's state is refused.
    cookie = make_cookie(settings, OAUTH_COOKIE, state, max_age=int(settings.oauth_state_ttl_s), path=OAUTH_COOKIE_PATH)
    return Redirect(oauth.authorize_url(state, verifier), status_code=302, cookies=[cookie], headers=HEADERS)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@get(
    "/auth/github/callback",
    **documented(ok=str, media_type=HTML, errors=(500,), extra={**redirect(303), **html(400), **html(502)}),
    **requires(Auth.GITHUB_STATE),
)
async def github_callback(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[Any]:
    settings = runtime.settings
    query = request.query_params
    code, state, error = query.get("code"), query.get("state"), query.get("error")
    spent_state = make_cookie(settings, OAUTH_COOKIE, "", max_age=0, path=OAUTH_COOKIE_PATH)
    browser_state = request.cookies.get(OAUTH_COOKIE)
    taken = None
    if state and browser_state and len(state) <= _MAX_PARAM and _same(state, browser_state):
        taken = await take_state(runtime.db, state)
    if taken is None:
        log.info("github_signin_refused", reason="state missing, mismatched, used or expired")
        # A reload or the back button after signing in: the account page, which shows no key.
        # The browser's own state cookie stays: a forged callback must not break its sign-in.
        if await session_account(request, runtime.db, settings) is not None:
            return Redirect("/account", status_code=303, headers=HEADERS)
        text = "This sign-in link has expired, was already used, or was started in another browser. Start again."
        return html_response(message_page("Sign-in expired", text, link=_START_AGAIN), status=400)
    if error is not None or not code or len(code) > _MAX_PARAM:
        log.info("github_signin_refused", reason="cancelled on GitHub" if error else "no code")
        page = message_page("Sign-in cancelled", "GitHub did not authorize the sign-in.", link=_START_AGAIN)
        return html_response(page, status=400, cookies=[spent_state])
    try:
        user = await GitHubOAuth(settings).user_for_code(code, taken.code_verifier)
    except GitHubError as exc:
        log.warning("github_signin_failed", reason=exc.reason)
        text = "GitHub did not accept this sign-in." if exc.refused else "GitHub could not be reached; try again."
        page = message_page("Sign-in failed", text, link=_START_AGAIN)
        return html_response(page, status=400 if exc.refused else 502, cookies=[spent_state])

    async with runtime.db.acquire() as conn, conn.transaction():
        account = await upsert_github_account(conn, user.id, user.login)
        # A new account gets its first key here; a returning one manages its keys on /account.
        first = await create_key(conn, account.account_id, name="first key") if account.created else None
        token = await create_session(conn, account.account_id, ttl_s=settings.session_ttl_s)
    log.info("github_signin", account_id=account.account_id, new_account=account.created)
    cookies = [session_cookie(settings, token), spent_state]
    # Checked again on the way out: the column's CHECK is a backstop, this is the rule.
    back = safe_return_path(taken.return_to)
    if first is None:
        return Redirect(back or "/account", status_code=303, headers=HEADERS, cookies=cookies)
    key, record = first
    page = one_shot_key_page(
        login=account.login, key=key, prefix=record.prefix, base_url=settings.public_url, next_path=back
    )
    return html_response(page, cookies=cookies, scripts=True)


@post(
    "/auth/logout",
    status_code=303,
    request_max_body_size=4096,
    **documented(status=303, errors=(403, 413, 500), extra=html(403)),
    **requires(Auth.SESSION_PAGE),
)
async def logout(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[Any]:
    check_origin(request, runtime.settings)
    token = session_token(request, runtime.settings)
    if token is not None:
        if not csrf_ok(request, runtime.settings, (await request.form()).get(FIELD)):
            return stale_form("You are still signed in")
        await end_session(runtime.db, token)
    return Redirect("/account", status_code=303, headers=HEADERS, cookies=[cleared_session_cookie(runtime.settings)])


_DEMO_REFUSED = {
    "ip": "Too many demo tokens from this address",
    "net64": "Too many demo tokens from this network (IPv6 /64)",
    "global": "The demo has handed out all its tokens for now",
}


@post(
    "/auth/demo",
    status_code=201,
    **documented(ok=DemoTokenIssued, status=201, errors=(429, 500)),
    **requires(Auth.PUBLIC),
)
async def demo_token(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[DemoTokenIssued]:
    """A demo token. Sent with a live one (`Authorization: Bearer mpd_...`), a renewal: the same subject (its
    quotas carry on) for a new lifetime, and no issuance budget spent, so an open demo page renews freely."""
    settings = runtime.settings
    renewing = _live_demo_token(request, runtime)
    if renewing is not None:
        token, issued = runtime.demo.issue(renewing.token_id)
        log.info("demo_token_renewed", demo_token_id=issued.token_id)
        return _issued(token, issued)
    ip = client_ip(request, trusted_hops=settings.trusted_proxy_hops)
    limits = DemoLimits(
        per_ip=settings.demo_tokens_per_ip,
        per_net64=settings.demo_tokens_per_net64,
        total=settings.demo_tokens_global,
        window_s=settings.demo_window_s,
    )
    refused = await take_demo_slot(runtime.db, ip, net64(ip), limits)
    if refused is not None:
        if refused.scope == "global":
            log.info("demo_tokens_exhausted", retry_after=refused.retry_after)
        raise RateLimited(
            f"{_DEMO_REFUSED[refused.scope]}; try again in {refused.retry_after} s, or sign up for a key.",
            headers={"retry-after": str(refused.retry_after)},
        )
    token, issued = runtime.demo.issue()
    log.info("demo_token_issued", demo_token_id=issued.token_id)
    return _issued(token, issued)


def _live_demo_token(request: Request[Any, Any, Any], runtime: Runtime) -> DemoToken | None:
    """The demo token the request carries, if any and still valid (an expired or forged one counts as none)."""
    if not request.headers.get("authorization"):
        return None
    try:
        # The same parsing (and size bound) as every authenticated route.
        token = bearer_token(request)
        return runtime.demo.verify(token) if token.startswith(DEMO_PREFIX) else None
    except ApiError:
        return None


def _issued(token: str, issued: DemoToken) -> Response[DemoTokenIssued]:
    body = DemoTokenIssued(
        token=token,
        expires_at=issued.expires_at,
        expires_in=issued.expires_at - issued.issued_at,
        allowed_routes=DEMO_ROUTES,
    )
    return Response(body, status_code=201, headers={"cache-control": "no-store"})
