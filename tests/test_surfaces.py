"""The wire details SDKs hide: Anthropic's exact event grammar and error shape, key-only routes,
and stored responses (owned per account, expiring, capped, shared by every gateway replica)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from infra.components import wait_model
from services.auth.demo import DemoTokens
from tests.support.accounts import make_account, query
from tests.support.stack import TINY_MODEL, Stack, replica_of

HELLO = [{"role": "user", "content": "Hello, how are you?"}]


def _sse(text: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(event name, data) of each server-sent event; every event ends with a blank line."""
    assert text.endswith("\n\n")
    out = []
    for block in text.split("\n\n")[:-1]:
        name, data = None, None
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data = json.loads(value)
        assert data is not None, block
        out.append((name, data))
    return out


# ---- Anthropic Messages -----------------------------------------------------------


def test_anthropic_stream_grammar(stack: Stack) -> None:
    body = {"model": TINY_MODEL, "max_tokens": 6, "stream": True, "messages": HELLO}
    r = httpx.post(f"{stack.v1}/messages", json=body, headers={"x-api-key": stack.api_key}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["request-id"] == r.headers["x-request-id"]
    events = _sse(r.text)
    # The event name always repeats the data's type.
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == []
    assert start["stop_reason"] is None
    assert start["id"] == f"msg_{r.headers['x-request-id']}"
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for _, d in events[3:-3])
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 6


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "kind"),
    [
        ("POST", "/v1/messages", {}, 401, "authentication_error"),
        ("POST", "/v1/messages", {"x-api-key": "mp_nope"}, 401, "authentication_error"),
        ("GET", "/v1/messages", None, 405, "invalid_request_error"),
        ("POST", "/v1/messages/nope", None, 404, "not_found_error"),
    ],
)
def test_anthropic_error_shape(
    stack: Stack, method: str, path: str, headers: dict[str, str] | None, status: int, kind: str
) -> None:
    hdrs = {"x-api-key": stack.api_key} if headers is None else headers
    r = httpx.request(method, f"{stack.base_url}{path}", json={}, headers=hdrs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind


def test_anthropic_bad_block_names_the_field(stack: Stack) -> None:
    body = {
        "model": TINY_MODEL,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}],
    }
    r = httpx.post(f"{stack.v1}/messages", json=body, headers={"x-api-key": stack.api_key})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0].type" in r.json()["error"]["message"]


# ---- key-only routes ---------------------------------------------------------------


def test_new_surfaces_refuse_demo_tokens(stack: Stack) -> None:
    token, _ = DemoTokens((stack.home / "secret_key").read_text().strip().encode(), ttl_s=60).issue()
    bearer = {"Authorization": f"Bearer {token}"}
    for path, body in (
        ("/completions", {"model": TINY_MODEL, "prompt": "hi", "max_tokens": 1}),
        ("/responses", {"model": TINY_MODEL, "input": "hi", "max_output_tokens": 1}),
    ):
        r = httpx.post(f"{stack.v1}{path}", json=body, headers=bearer)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "demo_token_not_allowed"
    r = httpx.post(
        f"{stack.v1}/messages", json={"model": TINY_MODEL, "max_tokens": 1, "messages": HELLO}, headers=bearer
    )
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error"


# ---- stored responses --------------------------------------------------------------


def _respond(base: str, key: str, **body: Any) -> httpx.Response:
    payload = {"model": TINY_MODEL, "max_output_tokens": 3, "temperature": 0, **body}
    return httpx.post(f"{base}/v1/responses", json=payload, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def replica(stack: Stack) -> Iterator[str]:
    """A second gateway on the same Postgres and NATS, as behind a load balancer."""
    with replica_of(stack, "gateway-responses") as (_, base):
        wait_model(base, TINY_MODEL, timeout=30)
        yield base


def test_any_replica_continues_any_conversation(stack: Stack, replica: str) -> None:
    first = _respond(stack.base_url, stack.api_key, input="Tell me about the sea.").json()
    second = _respond(replica, stack.api_key, input="And the sky?", previous_response_id=first["id"])
    assert second.status_code == 200, second.text
    usage = second.json()["usage"]
    assert usage["input_tokens"] > first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    assert httpx.get(f"{replica}/v1/responses/{first['id']}", headers=stack.auth()).json()["id"] == first["id"]


def test_another_accounts_response_is_not_found(stack: Stack) -> None:
    mine = _respond(stack.base_url, stack.api_key, input="hi").json()["id"]
    other = make_account(stack.database_url)
    assert httpx.get(f"{stack.v1}/responses/{mine}", headers=other.auth()).status_code == 404
    assert httpx.delete(f"{stack.v1}/responses/{mine}", headers=other.auth()).status_code == 404
    r = _respond(stack.base_url, other.key, input="more", previous_response_id=mine)
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "previous_response_id"
    # Still there for its owner.
    assert httpx.get(f"{stack.v1}/responses/{mine}", headers=stack.auth()).status_code == 200


def test_expired_responses_are_gone(stack: Stack) -> None:
    rid = _respond(stack.base_url, stack.api_key, input="hi").json()["id"]
    (row,) = query(stack.database_url, "SELECT expires_at - created_at AS ttl FROM stored_responses WHERE id = $1", rid)
    assert row["ttl"].total_seconds() == pytest.approx(86400, abs=5), "MP_RESPONSE_TTL_S default"
    query(stack.database_url, "UPDATE stored_responses SET expires_at = now() - interval '1 s' WHERE id = $1", rid)
    assert httpx.get(f"{stack.v1}/responses/{rid}", headers=stack.auth()).status_code == 404
    assert _respond(stack.base_url, stack.api_key, input="more", previous_response_id=rid).status_code == 404
    # The next stored response sweeps it away.
    _respond(stack.base_url, stack.api_key, input="again")
    assert not query(stack.database_url, "SELECT 1 FROM stored_responses WHERE id = $1", rid)


def test_stored_conversations_are_capped(stack: Stack) -> None:
    r = _respond(stack.base_url, stack.api_key, input="x" * (4 << 20))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "input"
    assert "store: false" in r.json()["error"]["message"]


def test_feedback_takes_any_surfaces_answer_id(stack: Stack) -> None:
    message = httpx.post(
        f"{stack.v1}/messages",
        json={"model": TINY_MODEL, "max_tokens": 2, "messages": HELLO},
        headers={"x-api-key": stack.api_key},
        timeout=60,
    ).json()
    answer = _respond(stack.base_url, stack.api_key, input="hi").json()
    for answer_id in (message["id"], answer["id"]):
        r = httpx.post(f"{stack.v1}/feedback", json={"request_id": answer_id, "rating": 4}, headers=stack.auth())
        assert r.status_code == 200, r.text
    r = httpx.post(f"{stack.v1}/feedback", json={"request_id": "abc\u0000", "rating": 4}, headers=stack.auth())
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "request_id"
