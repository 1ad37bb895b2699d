"""The keys service: a signed-in account lists, creates and revokes its keys (JSON and the account page)."""

from __future__ import annotations

import time

import httpx

from tests.support.auth_stack import AuthStack
from tests.support.github import ANY_KEY, new_user


def _signed_in(auth: AuthStack) -> httpx.Client:
    browser = auth.browser()
    auth.key_from_page(auth.sign_up(browser, new_user()))
    return browser


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_create_list_revoke(auth_stack: AuthStack) -> None:
    auth = auth_stack
    browser = _signed_in(auth)
    r = browser.post(f"{auth.a}/account/keys", json={"name": "laptop"})
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    created = r.json()
    key = created["key"]
    auth.secrets_seen.append(key)
    assert ANY_KEY.fullmatch(key)
    assert created["object"] == "api_key"
    assert created["name"] == "laptop"
    assert created["prefix"] == key[:9]
    assert created["last_used_at"] is None
    assert created["revoked_at"] is None
    assert abs(created["created_at"] - time.time()) < 60

    listing = browser.get(f"{auth.b}/account/keys").json()
    assert listing["object"] == "list"
    assert listing["data"][0]["id"] == created["id"], "newest first"
    assert len(listing["data"]) == 2, "the sign-up key and this one"
    assert key not in str(listing)
    assert all("key" not in k for k in listing["data"]), "the key itself is never listed"

    # Used once: last_used_at appears after the batched flush.
    assert httpx.get(f"{auth.b}/v1/models", headers=_bearer(key)).status_code == 200
    deadline = time.monotonic() + 5
    while True:
        mine = next(k for k in browser.get(f"{auth.a}/account/keys").json()["data"] if k["id"] == created["id"])
        if mine["last_used_at"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert mine["last_used_at"] is not None
    assert abs(mine["last_used_at"] - time.time()) < 60

    r = browser.delete(f"{auth.b}/account/keys/{created['id']}")
    assert r.status_code == 200, r.text
    revoked = r.json()
    assert revoked["revoked_at"] is not None
    assert "key" not in revoked
    # Revoking again is harmless and keeps the first time.
    again = browser.delete(f"{auth.a}/account/keys/{created['id']}").json()
    assert again["revoked_at"] == revoked["revoked_at"]
    r = httpx.get(f"{auth.a}/v1/models", headers=_bearer(key))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_accounts_cannot_touch_each_others_keys(auth_stack: AuthStack) -> None:
    auth = auth_stack
    alice, mallory = _signed_in(auth), _signed_in(auth)
    key_id, key = auth.create_key(alice)
    for target in (key_id, key_id + 10**9, 2**63 - 1, 2**70):
        r = mallory.delete(f"{auth.a}/account/keys/{target}")
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"
    assert mallory.get(f"{auth.a}/account/keys").json()["data"][0]["id"] != key_id
    r = mallory.post(f"{auth.a}/account/revoke/{key_id}", data=auth.form(mallory))
    assert r.status_code == 303
    assert httpx.get(f"{auth.a}/v1/models", headers=_bearer(key)).status_code == 200, "still valid"


def test_key_routes_need_a_session(auth_stack: AuthStack) -> None:
    auth = auth_stack
    for method, path in (("GET", "/account/keys"), ("POST", "/account/keys"), ("DELETE", "/account/keys/1")):
        for cookies in ({}, {"mp_session": "forged"}, {"mp_session": "x" * 4000}, {"mp_session": "' OR 1=1 --"}):
            r = httpx.request(method, f"{auth.a}{path}", cookies=cookies)
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["code"] == "not_signed_in"
    # An API key is not a session: a leaked key cannot mint keys or revoke its owner's others.
    r = httpx.get(f"{auth.a}/account/keys", headers=_bearer(auth.stack.api_key))
    assert r.status_code == 401


def test_cross_site_requests_are_refused(auth_stack: AuthStack) -> None:
    auth = auth_stack
    browser = _signed_in(auth)
    before = len(browser.get(f"{auth.a}/account/keys").json()["data"])
    evil = {"Origin": "https://evil.example"}
    for r in (
        browser.post(f"{auth.a}/account/keys", json={}, headers=evil),
        browser.post(f"{auth.a}/account/new-key", data={"name": "x"}, headers=evil),
        browser.post(f"{auth.a}/auth/logout", headers=evil),
    ):
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "cross_origin_refused"
    assert len(browser.get(f"{auth.a}/account/keys").json()["data"]) == before
    same = browser.post(f"{auth.a}/account/keys", json={}, headers={"Origin": auth.public_url})
    assert same.status_code == 201
    auth.secrets_seen.append(same.json()["key"])


def test_bad_bodies_are_named(auth_stack: AuthStack) -> None:
    auth = auth_stack
    browser = _signed_in(auth)
    url = f"{auth.a}/account/keys"
    r = browser.post(url, content=b"{nope", headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")
    r = browser.post(url, json={"name": "x" * 101})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "name")
    r = browser.post(url, json={"name": 5})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "name")
    r = browser.post(url, json={"scopes": ["all"]})
    assert r.status_code == 400
    r = browser.post(url, json={"name": "\x00\x1bcontrol\x7f  "})
    assert r.status_code == 201
    assert r.json()["name"] == "control"
    auth.secrets_seen.append(r.json()["key"])
    r = browser.post(url)  # no body: a key without a name
    assert r.status_code == 201
    auth.secrets_seen.append(r.json()["key"])


def test_account_page_forms(auth_stack: AuthStack) -> None:
    auth = auth_stack
    browser = _signed_in(auth)
    r = browser.post(f"{auth.b}/account/new-key", data={"name": "<script>alert(1)</script>", **auth.form(browser)})
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    key = auth.key_from_page(r.text)
    assert "<script>" not in r.text, "escaped"
    page = browser.get(f"{auth.a}/account").text
    assert key not in page
    assert key[:9] in page
    assert "&lt;script&gt;" in page
    key_id = next(k["id"] for k in browser.get(f"{auth.a}/account/keys").json()["data"] if k["prefix"] == key[:9])
    # Without this session's CSRF token (another site's form, an old page): refused, nothing revoked.
    for bad in ({}, {"csrf": "x" * 43}, {"csrf": auth.form(_signed_in(auth))["csrf"]}):
        r = browser.post(f"{auth.a}/account/revoke/{key_id}", data=bad)
        assert r.status_code == 403, r.text
        assert httpx.get(f"{auth.b}/v1/models", headers=_bearer(key)).status_code == 200
    r = browser.post(f"{auth.a}/account/revoke/{key_id}", data=auth.form(browser))
    assert (r.status_code, r.headers["location"]) == (303, "/account")
    assert "revoked" in browser.get(f"{auth.a}/account").text
    assert httpx.get(f"{auth.b}/v1/models", headers=_bearer(key)).status_code == 401

    # Signed out: the page offers sign-in, and the forms do nothing.
    stranger = auth.browser()
    assert "Sign in with GitHub" in stranger.get(f"{auth.a}/account").text
    r = stranger.post(f"{auth.a}/account/new-key")
    assert (r.status_code, r.headers["location"]) == (303, "/account")
    assert not ANY_KEY.search(r.text)
