"""Bad input gets the OpenAI error envelope with the right status, code and field."""

from __future__ import annotations

import time

import httpx
import pytest

from services.keys import format as key_format
from tests.support import rawhttp
from tests.support.stack import TINY_MODEL, Stack

GOOD = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _error(r: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


def _post(stack: Stack, body: object = GOOD, *, headers: dict[str, str] | None = None, content: bytes | None = None):
    hdrs = stack.auth() if headers is None else headers
    if content is not None:
        hdrs = {**hdrs, "content-type": "application/json"}
        return httpx.post(f"{stack.v1}/chat/completions", content=content, headers=hdrs)
    return httpx.post(f"{stack.v1}/chat/completions", json=body, headers=hdrs)


def test_missing_authorization(stack: Stack) -> None:
    error = _error(_post(stack, headers={}), 401, "missing_bearer_token")
    assert error["type"] == "authentication_error"


@pytest.mark.parametrize("value", [b"", b"   ", b"Basic dXNlcjpwYXNz", b"Bearer", b"Bearer   ", b"mp_abc", b"\tBearer"])
def test_not_a_bearer_token(stack: Stack, value: bytes) -> None:
    r = rawhttp.request(f"{stack.v1}/chat/completions", "POST", [(b"Authorization", value)], b"{}")
    assert r.status == 401, r.body
    assert r.json() == {"error": {**r.json()["error"], "code": "missing_bearer_token"}}  # type: ignore[index]


@pytest.mark.parametrize("token", [b"mp_\x01\x02\x7f", b"mp_\xff\xfe", b"mp_ab\x00cd"])
def test_control_characters_in_the_key(stack: Stack, token: bytes) -> None:
    r = rawhttp.request(f"{stack.v1}/chat/completions", "POST", [(b"Authorization", b"Bearer " + token)], b"{}")
    # The HTTP server may refuse such a header outright (400); if it gets to us it is a bad key (401).
    assert r.status in (400, 401), r.body
    if r.status == 401:
        assert r.json()["error"]["code"] == "invalid_api_key"  # type: ignore[index]


@pytest.mark.parametrize(
    "token",
    [
        "sk-not-ours",
        "mp_' OR '1'='1",
        "mp_" + "A" * 36,  # right length, wrong checksum
        "x" * 9000,  # over 8 KiB
    ],
)
def test_bad_keys_are_refused_without_a_server_error(stack: Stack, token: str) -> None:
    r = _post(stack, headers={"Authorization": f"Bearer {token}"})
    _error(r, 401, "invalid_api_key")


def test_well_formed_but_unknown_key(stack: Stack) -> None:
    key = key_format.generate()
    assert key_format.well_formed(key)
    _error(_post(stack, headers={"Authorization": f"Bearer {key}"}), 401, "invalid_api_key")


def test_a_mistyped_key_fails_its_checksum(stack: Stack) -> None:
    typo = stack.api_key[:-1] + ("A" if stack.api_key[-1] != "A" else "B")
    assert not key_format.well_formed(typo)
    _error(_post(stack, headers={"Authorization": f"Bearer {typo}"}), 401, "invalid_api_key")


def test_unknown_route_is_not_found(stack: Stack) -> None:
    _error(httpx.get(f"{stack.v1}/does-not-exist", headers=stack.auth()), 404, "not_found")
    # ("/" is the landing page.)
    _error(httpx.get(f"{stack.base_url}/nothing-here", headers=stack.auth()), 404, "not_found")


def test_wrong_method(stack: Stack) -> None:
    _error(httpx.get(f"{stack.v1}/chat/completions", headers=stack.auth()), 405, "method_not_allowed")


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2", b'{"model": "x", "messages": [}'])
def test_malformed_json(stack: Stack, content: bytes) -> None:
    _error(_post(stack, content=content), 400, "invalid_json")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"n": 2}, "n"),
        ({"model": ""}, "model"),
        ({"model": "mlx-community/*"}, "model"),
        ({"model": "mp.v1.>"}, "model"),
        ({"model": "two words"}, "model"),
        ({"model": "tab\there"}, "model"),
        ({"model": "ctrl\u0007"}, "model"),
        ({"model": "m" * 257}, "model"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_invalid_fields_are_named(stack: Stack, change: dict[str, object], param: str) -> None:
    error = _error(_post(stack, {**GOOD, **change}), 400, "invalid_value")
    assert error["type"] == "invalid_request_error"
    assert str(error["param"]).startswith(param), error
    assert param.split("[")[0] in str(error["message"])


def test_missing_required_field(stack: Stack) -> None:
    error = _error(_post(stack, {"messages": GOOD["messages"]}), 400, "invalid_value")
    assert "model" in str(error["message"])


def test_body_must_be_an_object(stack: Stack) -> None:
    _error(_post(stack, [1, 2, 3]), 400, "invalid_value")


def test_auth_is_checked_before_the_body(stack: Stack) -> None:
    _error(_post(stack, content=b"{broken", headers={}), 401, "missing_bearer_token")


def test_real_model_ids_with_dots_and_slashes_are_fine(stack: Stack) -> None:
    error = _error(
        _post(stack, {**GOOD, "model": "mlx-community/Llama-3.2-3B-Instruct-4bit"}), 503, "coordinator_unavailable"
    )
    assert "Llama-3.2" in str(error["message"])


def test_unserved_model_fails_fast(stack: Stack) -> None:
    started = time.monotonic()
    r = _post(stack, {**GOOD, "model": "no-such-model"})
    elapsed = time.monotonic() - started
    error = _error(r, 503, "coordinator_unavailable")
    assert TINY_MODEL in str(error["message"]), "the message lists what is served"
    assert elapsed < 0.5, f"took {elapsed:.3f}s: must not wait for a timeout"


def test_models_needs_a_key(stack: Stack) -> None:
    _error(httpx.get(f"{stack.v1}/models"), 401, "missing_bearer_token")
    _error(httpx.get(f"{stack.v1}/models", headers={"Authorization": "Bearer mp_nope"}), 401, "invalid_api_key")
