"""Hostile or broken credentials get a 401 with the right code: no 500, no database error,
and no database query at all for anything that is not a well-formed key."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.support import rawhttp
from tests.support.auth_stack import AuthStack

# (Authorization header value, the codes it may get): missing, not Bearer, huge, SQL, bad checksum...
BAD = [
    (b"", {"missing_bearer_token"}),
    (b"   ", {"missing_bearer_token"}),
    (b"Basic dXNlcjpwYXNz", {"missing_bearer_token"}),
    (b"Bearer", {"missing_bearer_token"}),
    (b"Bearer    ", {"missing_bearer_token"}),
    (b"mp_" + b"A" * 36, {"missing_bearer_token"}),
    (b"Bearer " + b"A" * 9000, {"invalid_api_key"}),
    (b"Bearer mp_" + b"A" * 9000, {"invalid_api_key"}),
    (b"Bearer mpd_" + b"A" * 9000, {"invalid_api_key"}),
    (b"Bearer mp_' OR '1'='1' --", {"invalid_api_key"}),
    (b"Bearer mp_'; DROP TABLE api_keys; --", {"invalid_api_key"}),
    (b"Bearer mp_" + b"A" * 36, {"invalid_api_key"}),  # right length, bad checksum
    (b"Bearer mp_" + b"a" * 35, {"invalid_api_key"}),  # one short
    (b"Bearer sk-proj-abcdef", {"invalid_api_key"}),
    (b"Bearer mp_\xc3\xa9\xc3\xa9\xc3\xa9", {"invalid_api_key"}),  # UTF-8
    (b"Bearer mp_\x01\x02\x03\x7f", {"invalid_api_key"}),
    (b"Bearer mpd_' UNION SELECT key_hash FROM api_keys --", {"invalid_demo_token"}),
    (b"Bearer mpd_e30.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", {"invalid_demo_token"}),
    (b"Bearer mpd_\x00\x01", {"invalid_demo_token"}),
]
ROUTES = [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]


def _pg_log(auth: AuthStack) -> str:
    return auth.stack.postgres.log_path.read_text(errors="replace")


def _key_lookups(text: str) -> int:
    return len(re.findall(r"FROM api_keys WHERE key_hash", text))


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_bad_authorization_values(auth_stack: AuthStack, method: str, path: str) -> None:
    auth = auth_stack
    log_before = _pg_log(auth)
    for value, codes in BAD:
        r = rawhttp.request(f"{auth.b}{path}", method, [(b"Authorization", value)], b"{}")
        # The HTTP server itself may refuse a header with control bytes (400); otherwise it is ours to refuse.
        if r.status == 400 and any(c < 0x20 or c == 0x7F for c in value):
            continue
        assert r.status == 401, (value[:60], r.status, r.body[:300])
        error = r.json()["error"]  # type: ignore[index]
        assert error["code"] in codes, (value[:60], error)
        assert error["type"] == "authentication_error"
        assert len(r.body) < 1000, "the bad value is not echoed back"
    log_after = _pg_log(auth)[len(log_before) :]
    # Replica b logs every statement it sends: none of these cost a key lookup, or any error.
    assert _key_lookups(log_after) == 0, log_after[-2000:]
    assert "ERROR:" not in log_after


def test_a_key_in_a_mixed_case_scheme_still_works(auth_stack: AuthStack) -> None:
    key = auth_stack.stack.api_key
    for scheme in (b"bearer", b"BEARER", b"bEaReR"):
        r = rawhttp.request(f"{auth_stack.b}/v1/models", "GET", [(b"Authorization", scheme + b" " + key.encode())])
        assert r.status == 200, r.body


def test_garbage_at_the_oauth_callback(auth_stack: AuthStack) -> None:
    auth = auth_stack
    exchanges = len(auth.github.exchanges)
    cases = [
        {},
        {"code": "x"},
        {"state": "' OR 1=1 --", "code": "'; DROP TABLE accounts; --"},
        {"state": "é" * 100, "code": "\u0000"},
        {"state": "s" * 20000, "code": "c" * 20000},
        {"error": "<script>alert(1)</script>", "state": "x"},
    ]
    for params in cases:
        state = params.get("state", "x")[:100]
        for cookie in ({}, {"mp_oauth_state": state if state.isascii() else "x"}):
            try:
                r = httpx.get(f"{auth.a}/auth/github/callback", params=params, cookies=cookie)
            except httpx.RemoteProtocolError:
                continue  # the HTTP server refused the request line itself
            assert r.status_code in (400, 414), (params, r.status_code, r.text[:300])
            assert "<script>" not in r.text
    assert len(auth.github.exchanges) == exchanges, "nothing reached GitHub"
    log = (auth.stack.home / "logs" / "gateway-auth-a.log").read_text(errors="replace")
    assert "unhandled_error" not in log
    assert "Traceback" not in log
