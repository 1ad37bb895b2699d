"""The few server-rendered HTML pages of sign-up and key management.

Every page is `no-store` (a key must not come back from a cache or the back
button), never framed, and loads nothing from anywhere. All text is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape

from litestar import Response
from litestar.datastructures import Cookie
from markupsafe import Markup

from services.keys.account_usage import AccountUsage
from services.keys.store import KeyInfo
from services.providers.macs import MacToken
from services.web.render import render

HEADERS = {
    "cache-control": "no-store",
    "pragma": "no-cache",
    # Not `no-referrer`: under it Chrome sends `Origin: null` with our own forms' POSTs, which
    # check_origin refuses. `same-origin` sends nothing to other sites, and our origin to ourselves.
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
}
# Pages with a copy button: our own script file too (services/web/static/account.js), still nothing inline.
SCRIPT_HEADERS = {
    **HEADERS,
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}


def _new_key_form(csrf: str) -> str:
    return (
        f'<form method="post" action="/account/new-key">{_csrf_field(csrf)}'
        '<label>Name (optional) <input name="name" maxlength="100"></label> '
        "<button>Create a new key</button></form>"
    )


def html_response(
    body: str, *, status: int = 200, cookies: Sequence[Cookie] = (), scripts: bool = False
) -> Response[str]:
    headers = SCRIPT_HEADERS if scripts else HEADERS
    return Response(content=body, status_code=status, media_type="text/html", headers=headers, cookies=list(cookies))


def _page(title: str, body: str, *, script: str | None = None) -> str:
    # The front door's layout (services/web/templates/base.html): one header, footer and stylesheet.
    return render("page.html", title=title, body=Markup(body), script=script)


def _when(value: datetime | None) -> str:
    return "never" if value is None else escape(value.strftime("%Y-%m-%d %H:%M UTC"))


def one_shot_key_page(*, login: str, key: str, prefix: str, base_url: str, next_path: str | None = None) -> str:
    # A sign-in started from another page (the device page) goes on there once the key is saved.
    onward = (
        f'<p><a href="{escape(next_path)}">I saved it: continue</a></p>'
        if next_path
        else '<p><a href="/account">Go to your account</a></p>'
    )
    body = (
        f"<p>Signed in as <b>{escape(login)}</b>. Here is your API key:</p>"
        f'<p class="key"><code id="new-key">{escape(key)}</code></p>'
        '<p><button type="button" data-copy="new-key" hidden>Copy</button> '
        '<span id="new-key-status" role="status"></span></p>'
        '<p class="warn"><b>Save it now: you will not see it again.</b> '
        f"We keep only a hash; after you leave this page you will see just its prefix "
        f"(<code>{escape(prefix)}…</code>). If you lose it, revoke it and create a new one.</p>"
        "<p>Use it with any OpenAI SDK:</p>"
        f'<pre tabindex="0">from openai import OpenAI\nclient = OpenAI(api_key="{escape(key)}", '
        f'base_url="{escape(base_url)}/v1")</pre>' + onward
    )
    return _page("Your new API key", body, script="/static/account.js")


def _csrf_field(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{escape(csrf)}">'


def _macs_section(macs: Sequence[MacToken], csrf: str) -> str:
    rows = "".join(
        f"<tr><td><code>{escape(m.prefix)}…</code></td><td>{escape(m.name)}</td><td><code>{escape(m.provider_id)}</code>"
        f"</td><td>{_when(m.created_at)}</td><td>{_when(m.last_used_at)}</td><td>"
        + (
            f"revoked {_when(m.revoked_at)}"
            if m.revoked_at is not None
            else f'<form method="post" action="/account/macs/{m.token_id}/revoke">{_csrf_field(csrf)}'
            "<button>Revoke</button></form>"
        )
        + "</td></tr>"
        for m in macs
    )
    table = (
        "<table><tr><th>Token</th><th>Mac</th><th>Provider id</th><th>Created</th><th>Last used</th><th></th></tr>"
        + rows
        + "</table>"
        if macs
        else "<p>No Mac has signed in yet: run <code>mac-provider-daemon login</code> on one.</p>"
    )
    return (
        "<h2>Your Macs</h2><p>Each Mac signed in with <code>mac-provider-daemon login</code> holds its own provider "
        "token. Revoking one cuts that Mac off from the pool at once.</p>" + table
    )


def _chart(usage: AccountUsage) -> str:
    """Requests per day as an SVG bar chart (no script, no style: presentation attributes only)."""
    width, height, gap = 600, 120, 2
    bar = width / len(usage.days)
    top = max((d.requests for d in usage.days), default=0) or 1
    total = sum(d.requests for d in usage.days)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - d.requests / top * height:.1f}" width="{bar - gap:.1f}" '
        f'height="{d.requests / top * height:.1f}" fill="#0b57d0"><title>{d.day.isoformat()}: {d.requests} '
        f"requests, {d.tokens} tokens</title></rect>"
        for i, d in enumerate(usage.days)
    )
    first, last = usage.days[0].day.isoformat(), usage.days[-1].day.isoformat()
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height + 1}" width="100%" role="img" aria-labelledby="chart-title">'
        f'<title id="chart-title">Requests per day from {first} to {last}: {total} in all, at most {top} a day'
        f'</title><line x1="0" y1="{height}" x2="{width}" y2="{height}" stroke="#767676"/>{bars}</svg>'
        f"<p><small>{first} … {last} (UTC days); hover a bar for its numbers.</small></p>"
    )


def _usage_section(usage: AccountUsage) -> str:
    t = usage.today
    lim = t.limits
    rows = [
        ("Requests", t.requests, lim.requests_per_day, t.requests_left),
        ("Tokens", t.tokens, lim.tokens_per_day, t.tokens_left),
        ("Running now", t.inflight, lim.concurrent, max(0, lim.concurrent - t.inflight)),
    ]
    today = (
        "<table><caption>Today (UTC), across all your keys</caption>"
        '<tr><th scope="col">Quota</th><th scope="col">Used</th><th scope="col">Limit</th>'
        '<th scope="col">Left</th></tr>'
        + "".join(
            f'<tr><th scope="row">{name}</th><td>{used}</td><td>{limit}</td><td>{left}</td></tr>'
            for name, used, limit, left in rows
        )
        + "</table>"
    )
    stars = {None: "not rated", 1: "1/5 (bad)", 2: "2/5", 3: "3/5", 4: "4/5", 5: "5/5 (excellent)"}
    recent = (
        "<table><caption>Your most recent requests</caption>"
        '<tr><th scope="col">When</th><th scope="col">Model</th><th scope="col">Tokens</th>'
        '<th scope="col">Outcome</th><th scope="col">Your rating</th></tr>'
        + "".join(
            f"<tr><td>{_when(r.created_at)}</td><td><code>{escape(r.model)}</code></td><td>{r.tokens}</td>"
            f"<td>{escape(r.outcome)}</td><td>{escape(stars.get(r.rating, str(r.rating)))}</td></tr>"
            for r in usage.recent
        )
        + "</table>"
        if usage.recent
        else "<p>No requests yet.</p>"
    )
    return (
        "<h2>Usage</h2>"
        + today
        + "<h3>Last 30 days</h3>"
        + _chart(usage)
        + recent
        + "<p>Rate an answer with <code>POST /v1/feedback</code>; <code>GET /v1/usage</code> has the same numbers "
        "as JSON.</p>"
    )


def account_page(
    *,
    login: str,
    keys: Sequence[KeyInfo],
    notice: str | None = None,
    macs: Sequence[MacToken] = (),
    csrf: str = "",
    usage: AccountUsage | None = None,
) -> str:
    rows = "".join(
        f"<tr><td><code>{escape(k.prefix)}…</code></td><td>{escape(k.name)}</td><td>{_when(k.created_at)}</td>"
        f"<td>{_when(k.last_used_at)}</td><td>"
        + (
            f"revoked {_when(k.revoked_at)}"
            if k.revoked_at is not None
            else f'<form method="post" action="/account/revoke/{k.key_id}">{_csrf_field(csrf)}'
            f'<button aria-label="Revoke key {escape(k.prefix)}…">Revoke</button></form>'
        )
        + "</td></tr>"
        for k in keys
    )
    table = (
        "<table><tr><th>Key</th><th>Name</th><th>Created</th><th>Last used</th><th></th></tr>" + rows + "</table>"
        if keys
        else "<p>You have no keys yet.</p>"
    )
    body = (
        (f"<p>{escape(notice)}</p>" if notice else "") + f"<p>Signed in as <b>{escape(login)}</b>.</p><h2>API keys</h2>"
        "<p>Keys are shown only once, when they are made; here you see their prefixes. "
        "Lost one? Revoke it and create a new one.</p>"
        + table
        + _new_key_form(csrf)
        + (_usage_section(usage) if usage is not None else "")
        + _macs_section(macs, csrf)
        + f'<h2>Session</h2><form method="post" action="/auth/logout">{_csrf_field(csrf)}'
        "<button>Sign out</button></form>"
    )
    return _page("Your account", body)


def device_page(*, login: str, csrf: str, user_code: str = "", name: str = "", notice: str | None = None) -> str:
    """The owner's side of `mac-provider-daemon login`: type (or check) the Mac's code, name it, approve or deny."""
    body = (
        (f'<p class="warn"><b>{escape(notice)}</b></p>' if notice else "")
        + f"<p>Signed in as <b>{escape(login)}</b>.</p>"
        "<p>Your Mac shows a code when you run <code>mac-provider-daemon login</code> on it. Approve it only if "
        "you started that yourself, just now: the Mac that holds this code will serve the pool as yours.</p>"
        '<form method="post" action="/device">'
        + _csrf_field(csrf)
        + '<p><label>Code <input name="user_code" required maxlength="16" autocomplete="off" spellcheck="false" '
        f'autocapitalize="characters" placeholder="XXXX-XXXX" value="{escape(user_code)}"></label></p>'
        '<p><label>Name for this Mac <input name="name" maxlength="64" placeholder="the name it asked for" '
        f'value="{escape(name)}"></label></p>'
        '<p><button name="action" value="approve">Approve</button> '
        '<button name="action" value="deny">Deny</button></p></form>'
        '<p><a href="/account">Your account and Macs</a></p>'
    )
    return _page("Sign in a Mac", body)


def stale_form(title: str) -> Response[str]:
    """A form without this session's CSRF token (another site's, or a page from before a sign-in): nothing done."""
    text = "This form is out of date or did not come from our page. Reload your account page and try again."
    return html_response(message_page(title, text, link=("/account", "Your account")), status=403)


def message_page(title: str, text: str, *, link: tuple[str, str] | None = None) -> str:
    more = f'<p><a href="{escape(link[0])}">{escape(link[1])}</a></p>' if link else ""
    return _page(title, f"<p>{escape(text)}</p>{more}")


def page(title: str, body: str) -> str:
    """A page of ours around `body` (HTML the caller escaped)."""
    return _page(title, body)
