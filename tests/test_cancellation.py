"""A buyer hanging up stops the generation on the provider; a vanished provider ends the stream in-band."""

from __future__ import annotations

import json
import signal
import socket
import time

import httpx

from infra.components import get_json, start_daemon, wait_model
from tests.support import logs
from tests.support.stack import TINY_MODEL, Stack

# Far more than the test waits for: if generation kept going, the slot would stay busy for a long while.
LONG = 30_000


def _daemon_log(stack: Stack) -> object:
    return stack.daemon.log_path


def _quick_request(stack: Stack) -> float:
    started = time.monotonic()
    r = httpx.post(
        f"{stack.v1}/chat/completions",
        json={"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers=stack.auth(),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return time.monotonic() - started


def test_stream_disconnect_cancels_generation(stack: Stack) -> None:
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": LONG}
    with httpx.stream("POST", f"{stack.v1}/chat/completions", json={**body, "stream": True}, headers=stack.auth()) as r:
        request_id = r.headers["x-request-id"]
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: {"):
                seen += 1
            if seen >= 5:
                break
    closed_at = time.time()
    done = logs.wait_event(stack.daemon.log_path, "request_done", request_id=request_id)
    assert done["finish"] == "cancelled"
    assert int(done["completion_tokens"]) < LONG // 4
    # The daemon stopped at once, not after a timeout (log timestamps share this machine's clock). It
    # takes tens of ms; the bound leaves room for a 2-core box running another test worker beside this.
    stopped_after = logs.timestamp(done) - closed_at
    print(f"daemon stopped {stopped_after * 1000:.0f} ms after the buyer hung up")
    assert stopped_after < 1.0, stopped_after
    # The slot is free again: a new request is answered at once, not after the abandoned one.
    assert _quick_request(stack) < 2.0
    gateway_line = logs.wait_event(stack.gateway.log_path, "chat_completion", request_id=request_id)
    assert gateway_line["status"] == "client_disconnected"


def _in_flight(stack: Stack) -> int:
    status, body = get_json(f"{stack.daemon.admin_url}/admin/status", headers=stack.daemon.admin_headers())
    assert status == 200
    assert isinstance(body, dict)
    return int(body["requests"]["in_flight"])


def test_non_stream_disconnect_cancels_generation(stack: Stack) -> None:
    before = len(logs.events(stack.gateway.log_path, "chat_completion"))
    # Another test's request may still be finishing on the shared daemon: count from here.
    busy = _in_flight(stack)
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": LONG}
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", int(stack.base_url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {stack.api_key}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        # Hang up once the daemon is generating.
        deadline = time.monotonic() + 20
        while _in_flight(stack) <= busy:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
    deadline = time.monotonic() + 20
    while True:
        lines = logs.events(stack.gateway.log_path, "chat_completion")[before:]
        gone = [e for e in lines if e["status"] == "client_disconnected"]
        if gone or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert gone, (busy, lines, stack.gateway.log_tail())
    done = logs.wait_event(stack.daemon.log_path, "request_done", request_id=gone[0]["request_id"])
    assert done["finish"] == "cancelled"
    assert int(done["completion_tokens"]) < LONG // 4
    # The slot is free again.
    deadline = time.monotonic() + 2
    while _in_flight(stack) > busy:
        assert time.monotonic() < deadline, "the daemon still runs the abandoned request"
        time.sleep(0.02)


def test_a_client_that_hangs_up_before_its_body_arrives_is_logged_as_gone(stack: Stack) -> None:
    before = len(logs.events(stack.gateway.log_path, "chat_completion"))
    errors_before = len(logs.events(stack.gateway.log_path, "unhandled_error"))
    with socket.create_connection(("127.0.0.1", int(stack.base_url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {stack.api_key}\r\nContent-Length: 500\r\n\r\n".encode()
            + b'{"model": "'
        )
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while not (lines := logs.events(stack.gateway.log_path, "chat_completion")[before:]):
        assert time.monotonic() < deadline, "no summary line for the abandoned request"
        time.sleep(0.05)
    # A hang-up, not a server error: nothing generated, nothing billed, no error logged.
    assert lines[0]["status"] == "client_disconnected", lines
    assert lines[0]["completion_tokens"] == "0"
    assert len(logs.events(stack.gateway.log_path, "unhandled_error")) == errors_before


def test_provider_killed_mid_stream_ends_with_an_error_chunk(stack: Stack) -> None:
    model = "tiny-llama-doomed"
    doomed = start_daemon(
        stack.home,
        nats=stack.nats,
        provider_id="doomed-mac",
        model_id=model,
        model_path=stack.model_path,
        env={"MP_HEARTBEAT_S": "0.5"},
    )
    try:
        wait_model(stack.base_url, model, timeout=60, daemon=doomed)
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG, "stream": True}
        events: list[str] = []
        with httpx.stream("POST", f"{stack.v1}/chat/completions", json=body, headers=stack.auth(), timeout=30) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                events.append(line.removeprefix("data: "))
                if len(events) == 5:
                    doomed.proc.send_signal(signal.SIGKILL)
                    killed_at = time.monotonic()
        ended_after = time.monotonic() - killed_at
    finally:
        doomed.stop()
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "error"
    assert last["error"]["code"] == "provider_lost"
    # Noticed within two missed 0.5 s heartbeats (plus a check tick), not after an idle timeout.
    assert ended_after < 1.6, ended_after
    # And the pool drops it after three.
    deadline = time.monotonic() + 3
    while model in [m["id"] for m in httpx.get(f"{stack.v1}/status").json()["models"]]:
        assert time.monotonic() < deadline, "the dead provider is still listed"
        time.sleep(0.1)
