"""The keys service, HTML: the account page and its forms (new key, revoke a key, revoke a Mac)."""

from __future__ import annotations

from typing import Any

import structlog
from litestar import Request, Response, get, post
from litestar.datastructures import FormMultiDict
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Redirect

from services.auth.csrf import FIELD, csrf_ok, csrf_token
from services.auth.declared import Auth, requires
from services.auth.sessions import check_origin, session_account
from services.keys.account_usage import account_usage
from services.keys.routes import clean_name
from services.keys.store import account_login, create_key, list_keys, revoke_key
from services.openapi import HTML, documented, html, redirect
from services.pages import HEADERS, account_page, html_response, message_page, one_shot_key_page, stale_form
from services.providers import tokens
from services.providers.macs import list_macs
from services.runtime import Runtime

log = structlog.get_logger("keys")

_SIGN_IN = ("/auth/github/start", "Sign in with GitHub")


async def _posted(
    request: Request[Any, Any, Any], runtime: Runtime, refused: str
) -> tuple[int, FormMultiDict] | Response[Any]:
    """The signed-in account that posted this form and the form, or the answer instead: back to /account
    when signed out, the stale-form page (`refused` says what did not happen) when its CSRF token is wrong."""
    check_origin(request, runtime.settings)
    account_id = await session_account(request, runtime.db, runtime.settings)
    if account_id is None:
        return Redirect("/account", status_code=303, headers=HEADERS)
    form = await request.form()
    if not csrf_ok(request, runtime.settings, form.get(FIELD)):
        return stale_form(refused)
    return account_id, form


def _signed_out() -> Response[str]:
    return html_response(message_page("Your account", "You are not signed in.", link=_SIGN_IN))


@get("/account", **documented(ok=str, media_type=HTML, errors=(500,)), **requires(Auth.SESSION_PAGE))
async def account(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[str]:
    account_id = await session_account(request, runtime.db, runtime.settings)
    if account_id is None:
        return _signed_out()
    login = await account_login(runtime.db, account_id) or ""
    page = account_page(
        login=login,
        keys=await list_keys(runtime.db, account_id),
        macs=await list_macs(runtime.db, account_id),
        csrf=csrf_token(request, runtime.settings),
        usage=await account_usage(runtime.db, account_id, runtime.settings),
    )
    return html_response(page)


@post(
    "/account/new-key",
    status_code=200,
    # No security requirement: signed out, the form answers with a redirect to /account, not a refusal.
    **documented(ok=str, media_type=HTML, errors=(403, 413, 500), extra={**redirect(303), **html(403)}),
    **requires(Auth.SESSION_PAGE),
)
async def account_new_key(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[Any]:
    posted = await _posted(request, runtime, "No key was created")
    if isinstance(posted, Response):
        return posted
    account_id, form = posted
    name = clean_name(str(form.get("name") or ""))
    key, record = await create_key(runtime.db, account_id, name=name)
    log.info("api_key_created", account_id=account_id, key_id=record.key_id)
    login = await account_login(runtime.db, account_id) or ""
    page = one_shot_key_page(login=login, key=key, prefix=record.prefix, base_url=runtime.settings.public_url)
    return html_response(page, scripts=True)


@post(
    "/account/revoke/{key_id:int}",
    status_code=303,
    request_max_body_size=4096,
    **documented(status=303, errors=(400, 403, 404, 413, 500), extra=html(403)),
    **requires(Auth.SESSION_PAGE),
)
async def account_revoke(
    request: Request[Any, Any, Any], runtime: NamedDependency[Runtime], key_id: FromPath[int]
) -> Response[Any]:
    posted = await _posted(request, runtime, "Nothing was revoked")
    if isinstance(posted, Response):
        return posted
    account_id, _ = posted
    if 0 < key_id < 2**63 and await revoke_key(runtime.db, account_id, key_id):
        runtime.keys.cache.invalidate(key_id)  # here at once; the other replicas by NOTIFY
        log.info("api_key_revoked", account_id=account_id, key_id=key_id)
    return Redirect("/account", status_code=303, headers=HEADERS)


@post(
    "/account/macs/{token_id:int}/revoke",
    status_code=303,
    request_max_body_size=4096,
    **documented(status=303, errors=(400, 403, 404, 413, 500), extra=html(403)),
    **requires(Auth.SESSION_PAGE),
)
async def account_revoke_mac(
    request: Request[Any, Any, Any], runtime: NamedDependency[Runtime], token_id: FromPath[int]
) -> Response[Any]:
    """Revoke one of the account's provider tokens: that Mac is cut off (the NATS side hears it by NOTIFY)."""
    posted = await _posted(request, runtime, "Nothing was revoked")
    if isinstance(posted, Response):
        return posted
    account_id, _ = posted
    # Another account's token and no token look the same: nothing happens, back to the page.
    if 0 < token_id < 2**63:
        provider_id = await tokens.revoke(runtime.db, token_id, account_id=account_id)
        if provider_id is not None:
            log.info("provider_token_revoked", account_id=account_id, token_id=token_id, provider_id=provider_id)
    return Redirect("/account", status_code=303, headers=HEADERS)
