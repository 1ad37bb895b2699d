"""No plaintext key, demo token, session token or OAuth code in the database or any log."""

from __future__ import annotations

import time

import httpx

from services.keys import format as key_format
from tests.support.auth_stack import AuthStack
from tests.support.github import new_user
from tests.support.stack import TINY_MODEL

CHAT = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_secrets_never_reach_the_database_or_the_logs(auth_stack: AuthStack) -> None:
    auth = auth_stack
    browser = auth.browser()
    # Keys from every path: the sign-up page, the JSON API, the account page's form, the dev key.
    first = auth.key_from_page(auth.sign_up(browser, new_user(), start=auth.b, back=auth.a))
    _, api_key = auth.create_key(browser, auth.b, name="api")
    revoked_id, revoked = auth.create_key(browser, auth.a, name="to revoke")
    form_key = auth.key_from_page(
        browser.post(f"{auth.a}/account/new-key", data={"name": "form", **auth.form(browser)}).text
    )
    session = browser.cookies.get("mp_session")
    assert session
    demo = httpx.post(f"{auth.a}/auth/demo", headers={"X-Forwarded-For": "2001:db8::5ec"}).json()["token"]
    keys = [first, api_key, revoked, form_key, auth.stack.api_key]

    # Use them, successfully and not.
    for key in keys:
        for replica in (auth.a, auth.b, auth.stack.base_url):
            r = httpx.post(f"{replica}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
    assert browser.delete(f"{auth.a}/account/keys/{revoked_id}").status_code == 200
    for replica in (auth.a, auth.b):
        assert httpx.get(f"{replica}/v1/models", headers={"Authorization": f"Bearer {revoked}"}).status_code == 401
        typo = form_key[:-1] + ("A" if form_key[-1] != "A" else "B")
        assert httpx.get(f"{replica}/v1/models", headers={"Authorization": f"Bearer {typo}"}).status_code == 401
        r = httpx.post(f"{replica}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {demo}"})
        assert r.status_code == 200, r.text
        r = httpx.post(f"{replica}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {demo}x"})
        assert r.status_code == 401
    time.sleep(0.5)  # last_used flushes, log lines land

    codes = [e.code for e in auth.github.exchanges]
    github_tokens = list(auth.github.state.tokens)
    secrets = {*keys, *auth.secrets_seen, demo, session, *codes, *github_tokens}
    assert len(secrets) > 8

    dump = auth.stack.postgres.dump()
    # The dump does hold the keys' rows (by digest), so looking in it means something.
    for key in keys:
        assert key_format.digest(key).hex() in dump
    logs = {p.name: p.read_text(errors="replace") for p in (auth.stack.home / "logs").glob("*.log")}
    logs["postgres.log"] = auth.stack.postgres.log_path.read_text(errors="replace")
    assert {"gateway.log", "gateway-auth-a.log", "gateway-auth-b.log"} <= set(logs)
    assert "chat_completion" in logs["gateway-auth-b.log"], "the logs did record these requests"
    # Booleans, so that a failure names the place without printing the secret itself.
    leaks = [
        f"{secret[:6]}… in {name}"
        for secret in secrets
        for name, text in {"the database dump": dump, **logs}.items()
        if secret in text
    ]
    assert leaks == []
