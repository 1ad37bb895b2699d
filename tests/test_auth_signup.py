"""GitHub sign-up through authlib against a loopback GitHub, across gateway replicas.

The key is shown once; state, code and PKCE verifier are each checked, and a
refused callback creates nothing.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import httpx
import pytest

from services.auth.sessions import cleared_session_cookie, cookies_secure, session_cookie
from services.settings import Settings
from tests.support.auth_stack import AuthStack
from tests.support.github import ANY_KEY, User, new_user


def accounts_of(auth: AuthStack, user: User) -> int:
    return int(auth.stack.postgres.psql(f"SELECT count(*) FROM accounts WHERE github_id = {user.id}").strip())


def keys_of(auth: AuthStack, user: User) -> int:
    return int(
        auth.stack.postgres.psql(
            f"SELECT count(*) FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE a.github_id = {user.id}"
        ).strip()
    )


def set_cookie(r: httpx.Response, name: str) -> str:
    found = [v for v in r.headers.get_list("set-cookie") if v.startswith(f"{name}=")]
    assert len(found) == 1, r.headers.get_list("set-cookie")
    return found[0]


def test_sign_up_shows_the_key_exactly_once(auth_stack: AuthStack) -> None:
    auth, user = auth_stack, new_user()
    browser = auth.browser()
    auth.github.sign_in(user)
    # Started on one replica, finished on another: the state lives in Postgres.
    callback = auth.authorize(browser, auth.a)
    r = browser.get(auth.on(auth.b, callback))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "same-origin"  # nothing to other sites (test_web.py: forms work)
    key = auth.key_from_page(r.text)
    assert user.login in r.text
    cookie = set_cookie(r, "mp_session").lower()
    assert "httponly" in cookie
    assert "samesite=lax" in cookie
    assert "path=/" in cookie
    assert "secure" not in cookie, "plain-http localhost: a Secure cookie would be dropped"
    assert accounts_of(auth, user) == 1
    assert keys_of(auth, user) == 1

    # The key works on every replica.
    for replica in (auth.a, auth.b):
        assert httpx.get(f"{replica}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    # Reload (and the back button, which re-requests a no-store page): no key, the account page instead.
    again = browser.get(auth.on(auth.a, callback))
    assert again.status_code == 303
    assert again.headers["location"] == "/account"
    assert not ANY_KEY.search(again.text)
    page = browser.get(f"{auth.b}/account")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert key not in page.text
    assert not ANY_KEY.search(page.text)
    assert key[:9] in page.text, "the prefix is shown"
    assert "Create a new key" in page.text

    # A second visit (another browser, same GitHub user): signed in, no key, nothing new.
    other = auth.browser()
    auth.github.sign_in(user)
    r = other.get(auth.on(auth.b, auth.authorize(other, auth.b)))
    assert r.status_code == 303
    assert r.headers["location"] == "/account"
    page = other.get(f"{auth.a}/account")
    assert not ANY_KEY.search(page.text)
    assert key[:9] in page.text
    assert accounts_of(auth, user) == 1
    assert keys_of(auth, user) == 1


def test_a_renamed_github_login_is_the_same_account(auth_stack: AuthStack) -> None:
    auth, user = auth_stack, new_user()
    auth.key_from_page(auth.sign_up(auth.browser(), user))
    renamed = User(id=user.id, login=user.login + "-renamed")
    auth.sign_up(auth.browser(), renamed)
    assert accounts_of(auth, user) == 1
    login = auth.stack.postgres.psql(f"SELECT login FROM accounts WHERE github_id = {user.id}").strip()
    assert login == renamed.login


def _refused(r: httpx.Response) -> None:
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert not ANY_KEY.search(r.text)
    assert "mp_session=" not in r.headers.get("set-cookie", "")


def test_missing_or_mismatched_state_is_refused_before_any_exchange(auth_stack: AuthStack) -> None:
    auth, user = auth_stack, new_user()
    browser = auth.browser()
    auth.github.sign_in(user)
    callback = auth.authorize(browser, auth.a)
    code = httpx.URL(callback).params["code"]
    exchanges = len(auth.github.exchanges)

    _refused(browser.get(f"{auth.a}/auth/github/callback", params={"code": code}))
    _refused(browser.get(f"{auth.a}/auth/github/callback", params={"code": code, "state": secrets.token_urlsafe(32)}))
    _refused(browser.get(f"{auth.a}/auth/github/callback", params={"code": code, "state": ""}))
    _refused(browser.get(f"{auth.a}/auth/github/callback", params={"code": code, "state": "x" * 5000}))
    # The right state from a browser that did not start the sign-in (login CSRF): refused too.
    _refused(auth.browser().get(auth.on(auth.a, callback)))
    assert len(auth.github.exchanges) == exchanges, "no code was sent to GitHub"
    assert accounts_of(auth, user) == 0

    # The genuine browser can still finish: the refusals above did not spend its state.
    auth.key_from_page(browser.get(auth.on(auth.b, callback)).text)
    assert accounts_of(auth, user) == 1


def test_a_used_state_is_refused(auth_stack: AuthStack) -> None:
    auth, first = auth_stack, new_user()
    browser = auth.browser()
    auth.github.sign_in(first)
    callback = auth.authorize(browser, auth.a)
    start_cookie = browser.cookies.get("mp_oauth_state")
    auth.key_from_page(browser.get(auth.on(auth.a, callback)).text)
    exchanges = len(auth.github.exchanges)

    # Replayed from a browser that has the state cookie but no session: refused, nothing sent to GitHub.
    replayer = httpx.Client(follow_redirects=False, cookies={"mp_oauth_state": start_cookie or ""})
    _refused(replayer.get(auth.on(auth.b, callback)))
    assert len(auth.github.exchanges) == exchanges
    assert keys_of(auth, first) == 1


def test_an_expired_state_is_refused(auth_stack: AuthStack) -> None:
    auth, user = auth_stack, new_user()
    browser = auth.browser()
    auth.github.sign_in(user)
    callback = auth.authorize(browser, auth.short)  # this replica's states live one second
    time.sleep(1.5)
    exchanges = len(auth.github.exchanges)
    _refused(browser.get(auth.on(auth.short, callback)))
    assert len(auth.github.exchanges) == exchanges
    assert accounts_of(auth, user) == 0


def test_a_reused_code_is_refused(auth_stack: AuthStack) -> None:
    auth, user = auth_stack, new_user()
    browser = auth.browser()
    auth.github.sign_in(user)
    first = auth.authorize(browser, auth.a)
    old_code = httpx.URL(first).params["code"]
    auth.key_from_page(browser.get(auth.on(auth.a, first)).text)

    # A fresh sign-in in the same browser, but with the spent code in the callback.
    fresh = auth.authorize(browser, auth.a)
    state = httpx.URL(fresh).params["state"]
    r = browser.get(f"{auth.b}/auth/github/callback", params={"code": old_code, "state": state})
    _refused(r)
    assert auth.github.exchanges[-1].outcome == "bad_verification_code"
    assert keys_of(auth, user) == 1


def test_a_code_with_another_sign_ins_verifier_is_refused(auth_stack: AuthStack) -> None:
    auth, user = auth_stack, new_user()
    browser = auth.browser()
    auth.github.sign_in(user)
    # Sign-in 1's code is bound to sign-in 1's PKCE challenge...
    code_1 = httpx.URL(auth.authorize(browser, auth.a)).params["code"]
    # ...and is presented with sign-in 2's state, so with sign-in 2's verifier.
    state_2 = httpx.URL(auth.authorize(browser, auth.a)).params["state"]
    r = browser.get(f"{auth.a}/auth/github/callback", params={"code": code_1, "state": state_2})
    _refused(r)
    assert auth.github.exchanges[-1].outcome == "bad_verification_code"
    assert accounts_of(auth, user) == 0
    assert keys_of(auth, user) == 0


def test_sign_in_cancelled_on_github(auth_stack: AuthStack) -> None:
    auth, user = auth_stack, new_user()
    browser = auth.browser()
    auth.github.sign_in(user)
    state = httpx.URL(auth.authorize(browser, auth.a)).params["state"]
    exchanges = len(auth.github.exchanges)
    r = browser.get(f"{auth.a}/auth/github/callback", params={"error": "access_denied", "state": state})
    _refused(r)
    assert len(auth.github.exchanges) == exchanges
    assert accounts_of(auth, user) == 0


def test_authorize_request_carries_pkce_and_a_fresh_state(auth_stack: AuthStack) -> None:
    auth = auth_stack
    browser = auth.browser()
    urls = [browser.get(f"{auth.a}/auth/github/start") for _ in range(2)]
    params = [httpx.URL(r.headers["location"]).params for r in urls]
    for p in params:
        assert p["code_challenge_method"] == "S256"
        assert len(p["code_challenge"]) == 43
        assert len(p["state"]) >= 32
        assert p["redirect_uri"] == f"{auth.public_url}/auth/github/callback"
    assert params[0]["state"] != params[1]["state"]
    cookie = set_cookie(urls[0], "mp_oauth_state").lower()
    assert "httponly" in cookie
    assert "samesite=lax" in cookie
    assert "max-age=600" in cookie
    assert urls[0].headers["cache-control"] == "no-store"


def test_sign_in_is_unavailable_without_github_settings(auth_stack: AuthStack) -> None:
    # The session stack's gateway has no GitHub client configured (like `just up`).
    r = httpx.get(f"{auth_stack.stack.base_url}/auth/github/start")
    assert r.status_code == 503
    assert "dev.env" in r.text


@pytest.mark.parametrize("public_url", ["https://api.example.com", "http://mp.internal:8080"])
def test_session_cookie_is_secure_off_localhost(public_url: str, tmp_path: Path) -> None:
    settings = Settings.from_env({"MP_HOME": str(tmp_path), "MP_PUBLIC_URL": public_url})
    assert cookies_secure(settings)
    header = session_cookie(settings, "t").to_header(header="").lower()
    assert header.startswith("__host-mp_session=t")
    assert "secure" in header
    assert "httponly" in header
    assert "samesite=lax" in header
    assert "path=/" in header
    assert "max-age=0" in cleared_session_cookie(settings).to_header(header="").lower()


def test_sign_out(auth_stack: AuthStack) -> None:
    auth = auth_stack
    browser = auth.browser()
    auth.key_from_page(auth.sign_up(browser, new_user()))
    assert browser.get(f"{auth.a}/account/keys").status_code == 200
    token = browser.cookies.get("mp_session")
    r = browser.post(f"{auth.b}/auth/logout")  # without the page's CSRF token: still signed in
    assert r.status_code == 403
    assert browser.get(f"{auth.a}/account/keys").status_code == 200
    r = browser.post(f"{auth.b}/auth/logout", data=auth.form(browser))
    assert r.status_code == 303
    assert browser.get(f"{auth.a}/account/keys").status_code == 401
    # The old cookie is dead on the server too, not just dropped by the browser.
    r = httpx.get(f"{auth.a}/account/keys", cookies={"mp_session": token or ""})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "not_signed_in"
