"""Device login's owner side: the /device page where a signed-in owner approves (or denies) a Mac's code.

Signed out, the page sends the browser through GitHub sign-in and back to itself,
with the code (a same-site path only: services/auth/return_path.py). The form is
CSRF-protected (services/auth/csrf.py) besides the Origin check, loads no script,
and says plainly what happened. User codes are short, so codes that match nothing
are budgeted per client and per account (services/providers/device_budgets.py).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import structlog
from litestar import Request, Response, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.response import Redirect

from schemas.device import display_user_code, normalize_user_code
from services.auth.client_ip import client_ip, client_key
from services.auth.csrf import FIELD, csrf_ok, csrf_token
from services.auth.declared import Auth, requires
from services.auth.sessions import check_origin, session_account
from services.keys.store import account_login
from services.openapi import HTML, documented, html, redirect
from services.pages import HEADERS, device_page, html_response, message_page
from services.providers import device
from services.providers.device_budgets import DEVICE_BUDGETS, DeviceBudgets
from services.runtime import Runtime

log = structlog.get_logger("device_login")

MAX_FORM = 4096
_AGAIN = ("/device", "Enter another code")


def _text(value: str | UploadFile | None) -> str:
    return value if isinstance(value, str) else ""


@get(
    "/device",
    **documented(ok=str, media_type=HTML, errors=(500,), extra=redirect(303)),
    **requires(Auth.SESSION_PAGE),
)
async def device_form(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[Any]:
    settings = runtime.settings
    code = normalize_user_code(request.query_params.get("user_code") or "")
    shown = display_user_code(code) if code else ""
    account_id = await session_account(request, runtime.db, settings)
    if account_id is None:
        back = "/device" + (f"?{urlencode({'user_code': shown})}" if shown else "")
        return Redirect(f"/auth/github/start?{urlencode({'next': back})}", status_code=303, headers=HEADERS)
    login = await account_login(runtime.db, account_id) or ""
    return html_response(device_page(login=login, csrf=csrf_token(request, settings), user_code=shown))


@post(
    "/device",
    status_code=200,
    request_max_body_size=MAX_FORM,
    # Signed out, the form answers with a redirect to the page (which sends the browser to sign in).
    **documented(
        ok=str, media_type=HTML, errors=(413, 500), extra={**redirect(303), **html(400), **html(403), **html(429)}
    ),
    **requires(Auth.SESSION_PAGE),
)
async def device_decide(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[Any]:
    settings = runtime.settings
    check_origin(request, settings)
    account_id = await session_account(request, runtime.db, settings)
    if account_id is None:
        return Redirect("/device", status_code=303, headers=HEADERS)
    form = await request.form()
    if not csrf_ok(request, settings, form.get(FIELD)):
        text = "This form is out of date or did not come from our page. Reload the page and try again."
        return html_response(message_page("Nothing was done", text, link=_AGAIN), status=403)
    login = await account_login(runtime.db, account_id) or ""
    csrf = csrf_token(request, settings)
    raw_code, raw_name = _text(form.get("user_code")), _text(form.get("name"))
    action = _text(form.get("action"))

    def again(notice: str, status: int, headers: dict[str, str] | None = None) -> Response[str]:
        code = normalize_user_code(raw_code)
        page = device_page(
            login=login,
            csrf=csrf,
            user_code=display_user_code(code) if code else "",
            name=raw_name[:64],
            notice=notice,
        )
        response = html_response(page, status=status)
        response.headers.update(headers or {})
        return response

    if action not in ("approve", "deny"):
        return again("Choose Approve or Deny.", 400)
    code = normalize_user_code(raw_code)
    if code is None:
        return again("That is not a code: codes are 8 letters, like BCDF-GHJK.", 400)
    name = device.clean_mac_name(raw_name)
    if name is None:
        return again("The name may have at most 64 characters and no control characters.", 400)

    # Spent before the lookup, given back when the code is found.
    budgets: DeviceBudgets = request.app.state[DEVICE_BUDGETS]
    client, holder = client_key(client_ip(request, trusted_hops=settings.trusted_proxy_hops)), f"a{account_id}"
    wait = budgets.wrong_codes_client.take(client)
    if wait is None:
        wait = budgets.wrong_codes_account.take(holder)
        if wait is not None:
            budgets.wrong_codes_client.give_back(client)
    if wait is not None:
        log.info("device_code_guesses_refused", account_id=account_id)
        return again(f"Too many wrong codes. Wait {wait} s, then try again.", 429, {"retry-after": str(wait)})

    decision = await device.decide(runtime.db, code, account_id=account_id, approve=action == "approve", name=name)
    if decision is device.Decision.UNKNOWN:
        log.info("device_code_unknown", account_id=account_id)
        return again(
            "Unknown or expired code. Check it on your Mac; codes expire "
            f"{settings.device_code_ttl_s // 60 or 1} min after `mac-provider-daemon login` shows them "
            "(run it again for a new one).",
            400,
        )
    budgets.wrong_codes_client.give_back(client)
    budgets.wrong_codes_account.give_back(holder)
    if decision is device.Decision.ALREADY:
        text = "You already answered this code. If the Mac is signed in, it is listed on your account page."
        return html_response(message_page("Already done", text, link=("/account", "Your account and Macs")))
    log.info("device_code_decided", account_id=account_id, approved=decision is device.Decision.APPROVED)
    if decision is device.Decision.APPROVED:
        text = (
            "Approved. Return to your Mac: `mac-provider-daemon login` finishes there within a few seconds and "
            "saves its credentials. Then start it with `brew services start mac-provider-daemon`."
        )
        return html_response(message_page("Mac approved", text, link=("/account", "Your account and Macs")))
    text = "Denied. Nothing was signed in; the Mac that asked is told so."
    return html_response(message_page("Sign-in denied", text, link=("/account", "Your account")))
