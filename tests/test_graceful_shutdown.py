"""A gateway replica's probes and its SIGTERM: readiness fails at once, new requests are refused cleanly,
running streams finish (or, past MP_SHUTDOWN_GRACE_S, end in-band), each is settled once, and it exits 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from infra.components import Child, wait_model
from tests.support import logs
from tests.support.accounts import query
from tests.support.stack import TINY_MODEL, Stack, replica_of

GRACE_S = 5.0
WARMUP_S = 2.0
# The tiny model writes ~500 tokens/s here: SHORT ends about a second after SIGTERM, well within
# the grace even on a loaded machine; LONG outlasts it by far.
SHORT = 600
LONG = 30_000


@dataclass
class Reader:
    """Reads one stream in a thread: its SSE payloads, and when the last one came."""

    base: str
    key: str
    max_tokens: int
    payloads: list[str] = field(default_factory=list)
    request_id: str = ""
    ended_at: float = 0.0
    error: BaseException | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Reader:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        body = {
            "model": TINY_MODEL,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": self.max_tokens,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {self.key}"}
        try:
            with httpx.stream("POST", f"{self.base}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
                assert r.status_code == 200, r.read()
                self.request_id = r.headers["x-request-id"]
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.payloads.append(line.removeprefix("data: "))
        except BaseException as exc:
            self.error = exc
        self.ended_at = time.monotonic()

    def chunks(self) -> list[dict[str, object]]:
        return [json.loads(p) for p in self.payloads if p != "[DONE]"]

    def join(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"stream still open after {timeout}s"
        assert self.error is None, repr(self.error)


@pytest.fixture
def replica(stack: Stack) -> Iterator[tuple[Child, str]]:
    env = {"MP_SHUTDOWN_DELAY_S": "0", "MP_SHUTDOWN_GRACE_S": str(GRACE_S), "MP_POOL_WARMUP_S": str(WARMUP_S)}
    with replica_of(stack, "gateway-sigterm", env) as replica:
        yield replica


def _ready(base: str) -> httpx.Response:
    return httpx.get(f"{base}/healthz/ready", timeout=5)


def test_probes_then_sigterm_drains_refuses_settles_and_exits_0(stack: Stack, replica: tuple[Child, str]) -> None:
    gateway, base = replica
    # Up, but not yet listened to heartbeats for a heartbeat interval: not ready, and says why.
    r = _ready(base)
    assert r.status_code == 503, r.text
    assert r.json() == {
        "status": "not_ready",
        "stopping": False,
        "database": True,
        "nats": True,
        "pool_warm": False,
    }
    assert httpx.get(f"{base}/healthz/live", timeout=5).json() == {"status": "alive"}
    deadline = time.monotonic() + WARMUP_S + 5
    while (r := _ready(base)).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    assert r.json()["status"] == "ready"
    wait_model(base, TINY_MODEL, timeout=10)

    short = Reader(base, stack.api_key, SHORT).start()
    long = Reader(base, stack.api_key, LONG).start()
    deadline = time.monotonic() + 30
    while len(short.payloads) < 3 or len(long.payloads) < 3:
        assert time.monotonic() < deadline, (short, long)
        time.sleep(0.02)

    gateway.proc.send_signal(signal.SIGTERM)
    sigterm = time.monotonic()
    # Readiness fails at once (the process still serves: its streams run).
    r = _ready(base)
    noticed = time.monotonic() - sigterm
    assert r.status_code == 503, r.text
    assert r.json()["stopping"] is True
    assert noticed < 0.5, noticed
    # A new request is refused cleanly: the OpenAI envelope, a retry hint, and no kept-alive connection.
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers=stack.auth(),
        timeout=10,
    )
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "coordinator_unavailable"
    assert r.json()["error"]["type"] == "service_unavailable_error"
    assert r.headers["retry-after"] == "1"
    assert r.headers["connection"] == "close"

    # The short stream runs to its end, after the signal.
    short.join(GRACE_S + 5)
    assert short.ended_at > sigterm
    assert short.payloads[-1] == "[DONE]"
    finishes = [c["choices"][0]["finish_reason"] for c in short.chunks() if c["choices"]]  # type: ignore[index]
    assert finishes[-1] == "length", short.payloads[-3:]
    assert not any("error" in c and c["error"] for c in short.chunks())

    # The long one outlasts the grace: it ends then, with the protocol's in-band error, not cut off.
    long.join(GRACE_S + 10)
    ended_after = long.ended_at - sigterm
    assert GRACE_S - 0.5 < ended_after < GRACE_S + 2, ended_after
    assert long.payloads[-1] == "[DONE]"
    last = json.loads(long.payloads[-2])
    assert last["choices"][0]["finish_reason"] == "error"
    assert last["error"]["code"] == "shutting_down"

    # The process exits by itself, cleanly, within the bound.
    code = gateway.proc.wait(timeout=GRACE_S + 10)
    exited_after = time.monotonic() - sigterm
    assert code == 0, gateway.log_tail()
    assert exited_after < GRACE_S + 5, exited_after
    print(
        f"ready failed {noticed * 1000:.0f} ms after SIGTERM; short stream done at {short.ended_at - sigterm:.1f} s, "
        f"long one cut at {ended_after:.1f} s, exit at {exited_after:.1f} s (grace {GRACE_S:g} s)"
    )

    # Each request is in the ledger exactly once, billed for what the buyer received; nothing left reserved.
    rows = {
        r["request_id"]: r
        for r in query(
            stack.database_url,
            "SELECT request_id, outcome, billed, completion_tokens FROM usage_ledger WHERE request_id = ANY($1)",
            [short.request_id, long.request_id],
        )
    }
    assert len(rows) == 2, rows
    assert rows[short.request_id]["outcome"] == "ok"
    assert rows[short.request_id]["completion_tokens"] == SHORT
    assert rows[long.request_id]["outcome"] == "failed"
    assert rows[long.request_id]["billed"] is True
    summary = logs.wait_event(gateway.log_path, "chat_completion", request_id=long.request_id)
    assert summary["status"] == "shutting_down"
    assert rows[long.request_id]["completion_tokens"] == int(summary["completion_tokens"]) > 0
    left = query(
        stack.database_url,
        "SELECT 1 FROM reservations WHERE request_id = ANY($1)",
        [short.request_id, long.request_id],
    )
    assert left == []
    # The provider was told to stop the cut generation.
    done = logs.wait_event(stack.daemon.log_path, "request_done", request_id=long.request_id)
    assert done["finish"] == "cancelled"


def test_an_idle_connection_is_kept_longer_than_a_proxy_keeps_it(stack: Stack) -> None:
    """Caddy (and nginx) keep an idle upstream connection 60 s; uvicorn used to close it after 5 s. A
    request the proxy sent on it just as the gateway closed it failed, and a POST is not retried: the
    gateway keeps idle connections MP_HTTP_KEEPALIVE_S (75 s). The same socket answers after 6 s idle."""
    host, _, port = stack.base_url.removeprefix("http://").partition(":")
    request = f"GET /healthz/live HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        for pause in (0.0, 6.0):
            time.sleep(pause)
            conn.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                chunk = conn.recv(4096)
                assert chunk, f"the gateway closed the connection after {pause:g} s idle"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
