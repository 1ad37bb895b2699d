"""Metrics and traces, read the way an operator reads them: a Prometheus scrape and a span file.

The session's gateway and daemon are scraped around a few requests whose effect
on each counter is known exactly. A gateway and a daemon of their own write
their spans to files (MP_OTEL_EXPORTER=jsonl:...), and one buyer request must
be one trace across both processes, carried by the NATS message's headers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from daemon.settings import DaemonSettings
from daemon.settings import SettingsError as DaemonSettingsError
from infra.components import Child, DaemonChild, start_gateway, wait_model
from infra.nats_auth import control_url
from infra.ports import free_port
from schemas import bus, subjects
from schemas.tracing import parse_traceparent, remote_parent
from services.settings import Settings, SettingsError, ensure_local_secrets
from tests.support.daemons import bus_request, spawn_daemon
from tests.support.logs import wait_event
from tests.support.metrics import label_values, moved, scrape, value
from tests.support.stack import TINY_MODEL, Stack

HELLO = [{"role": "user", "content": "Hello, how are you?"}]
TRACED_MODEL = "traced-tiny"
TRACED_PROVIDER = "traced-mac"


def _token(stack: Stack) -> str:
    # MP_METRICS_TOKEN is unset in the suite: the gateway made one in its MP_HOME.
    return (stack.home / "metrics_token").read_text().strip()


def _chat(base: str, key: str, **body: Any) -> httpx.Response:
    payload = {"model": TINY_MODEL, "messages": HELLO, "temperature": 0, **body}
    return httpx.post(
        f"{base}/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def test_gateway_metrics_move_by_exactly_what_was_sent(stack: Stack) -> None:
    url, token = f"{stack.base_url}/metrics", _token(stack)
    before, _ = scrape(url, token)
    route = "/v1/chat/completions"

    ok = _chat(stack.base_url, stack.api_key, max_tokens=16, stream=True, stream_options={"include_usage": True})
    assert ok.status_code == 200, ok.text
    usage = json.loads(ok.text.split("data: ")[-2])["usage"]
    assert usage["completion_tokens"] == 16
    unknown_model = "no-such-model-" + "x" * 40
    missing = _chat(stack.base_url, stack.api_key, model=unknown_model, max_tokens=4)
    assert missing.status_code == 503, missing.text
    assert missing.json()["error"]["code"] == "coordinator_unavailable"
    bad = _chat(stack.base_url, stack.api_key, max_tokens=-1)
    assert bad.status_code == 400, bad.text
    bad_code = bad.json()["error"]["code"]
    nowhere = httpx.get(f"{stack.base_url}/v1/nowhere/{unknown_model}", timeout=10)
    assert nowhere.status_code == 404
    odd = httpx.request("PROPFIND", f"{stack.base_url}/v1/models", timeout=10)
    assert odd.status_code == 405

    after, text = scrape(url, token)
    # Requests and errors by route template and code.
    assert moved(before, after, "mp_http_requests_total", route=route, method="POST", status="200") == 1
    assert moved(before, after, "mp_http_requests_total", route=route, method="POST", status="503") == 1
    assert moved(before, after, "mp_http_requests_total", route=route, method="POST", status="400") == 1
    assert moved(before, after, "mp_http_errors_total", route=route, code="coordinator_unavailable") == 1
    assert moved(before, after, "mp_http_errors_total", route=route, code=bad_code) == 1
    assert moved(before, after, "mp_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert moved(before, after, "mp_http_errors_total", route="unmatched", code="not_found") == 1
    assert moved(before, after, "mp_http_requests_total", route="unmatched", method="other", status="405") == 1
    # Per buyer request: outcome and model, the model only if the pool serves it.
    chat = {"surface": "chat_completion"}
    assert moved(before, after, "mp_gateway_requests_total", **chat, model=TINY_MODEL, outcome="ok") == 1
    assert (
        moved(before, after, "mp_gateway_requests_total", **chat, model="other", outcome="coordinator_unavailable") == 1
    )
    assert moved(before, after, "mp_gateway_requests_total", **chat, model="other", outcome=bad_code) == 1
    assert unknown_model not in text, "a buyer's model name never becomes a label"
    assert "nowhere" not in text, "nor a path they made up"
    assert label_values(after, "model") <= label_values(before, "model") | {TINY_MODEL, "other"}
    # TTFT, tokens and decoding speed: one answer of 16 tokens.
    assert moved(before, after, "mp_gateway_ttft_seconds_count", model=TINY_MODEL) == 1
    assert moved(before, after, "mp_gateway_completion_tokens_total", model=TINY_MODEL) == 16
    assert moved(before, after, "mp_gateway_decode_tokens_per_second_count", model=TINY_MODEL) == 1
    gaps = moved(before, after, "mp_gateway_inter_token_seconds_count", model=TINY_MODEL)
    assert 1 <= gaps <= 15, gaps
    assert moved(before, after, "mp_gateway_ttft_seconds_count", model="other") == 0
    # Read at scrape time: the pool, the connections, the ledger.
    assert value(after, "mp_pool_providers", model=TINY_MODEL) >= 1
    assert value(after, "mp_pool_slots_free", model=TINY_MODEL) >= 1
    assert value(after, "mp_nats_connected", connection="control_plane") == 1
    assert value(after, "mp_postgres_reachable") == 1
    assert moved(before, after, "mp_usage_settlement_lag_seconds_count") == 3 - 1  # the 400 reserved nothing
    assert value(after, "mp_usage_open_reservations") == 0
    assert value(after, "mp_usage_unwritten_events") >= 0
    # Two usage events for the streamed request (its reservation, then its settlement), one for the whole
    # answer refused (its reservation goes with its settlement: usage_events.Whole), some sharing a message.
    assert moved(before, after, "mp_usage_events_published_total") == 2 + 1
    assert 1 <= moved(before, after, "mp_usage_event_messages_total") <= 2 + 1
    assert value(after, "process_resident_memory_bytes") > 0


def test_metrics_need_the_metrics_token(stack: Stack) -> None:
    url = f"{stack.base_url}/metrics"
    for headers, code in (
        ({}, "missing_metrics_token"),
        ({"Authorization": f"Bearer {stack.api_key}"}, "invalid_metrics_token"),
        ({"Authorization": f"Bearer {_token(stack)}x"}, "invalid_metrics_token"),
        ({"Authorization": f"Basic {_token(stack)}"}, "invalid_metrics_token"),
    ):
        r = httpx.get(url, headers=headers, timeout=10)
        assert (r.status_code, r.json()["error"]["code"]) == (401, code), r.text
        assert "mp_" not in r.text


def test_daemon_admin_metrics(stack: Stack) -> None:
    daemon = stack.daemon
    url = f"{daemon.admin_url}/metrics"
    assert httpx.get(url, timeout=10).status_code == 401, "the admin token guards it"
    token = daemon.admin_headers()["Authorization"].removeprefix("Bearer ")
    before, _ = scrape(url, token)
    r = _chat(stack.base_url, stack.api_key, max_tokens=7)
    assert r.status_code == 200, r.text
    after, _ = scrape(url, token)
    assert moved(before, after, "mp_daemon_requests_total", outcome="length") == 1
    assert moved(before, after, "mp_daemon_generated_tokens_total") == 7
    assert moved(before, after, "mp_daemon_prompt_tokens_total") == r.json()["usage"]["prompt_tokens"]
    assert moved(before, after, "mp_daemon_ttft_seconds_count") == 1
    assert moved(before, after, "mp_daemon_decode_tokens_per_second_count") == 1
    assert moved(before, after, "mp_daemon_prepare_seconds_count") == 1
    hits = sum(moved(before, after, "mp_daemon_prompt_cache_requests_total", result=x) for x in ("hit", "miss"))
    assert hits == 1
    assert value(after, "mp_daemon_worker_state", state="healthy") == 1
    assert value(after, "mp_daemon_worker_restarts_total") >= 0
    assert value(after, "mp_daemon_batch_occupancy") == 0  # nothing running between requests
    assert value(after, "mp_daemon_pool_connected") == 1


def test_a_batch_step_reaches_the_gateway_as_bundles(stack: Stack) -> None:
    """Requests decoded together: each step's tokens for the one gateway travel as bundles
    (daemon/outbox.py), and every answer still arrives whole."""
    daemon = stack.daemon
    url = f"{daemon.admin_url}/metrics"
    token = daemon.admin_headers()["Authorization"].removeprefix("Bearer ")
    before, _ = scrape(url, token)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _chat(stack.base_url, stack.api_key, max_tokens=64, stream=True), range(6)))
    assert [r.status_code for r in answers] == [200] * 6
    assert all(r.text.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in r.text for r in answers)
    after, _ = scrape(url, token)
    bundles = moved(before, after, "mp_daemon_frame_bundles_total")
    frames = moved(before, after, "mp_daemon_bundled_frames_total")
    assert bundles > 0, "six requests decoded together sent no bundle"
    assert frames >= 2 * bundles


# ---- traces -------------------------------------------------------------------------------------


@dataclass
class Traced:
    base_url: str
    gateway: Child
    daemon: DaemonChild
    gateway_spans: Path
    daemon_spans: Path


@pytest.fixture(scope="module")
def traced(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    """A gateway and a daemon writing their spans to files; the daemon alone serves TRACED_MODEL."""
    spans = tmp_path_factory.mktemp("spans")
    port = free_port()
    gateway = start_gateway(
        stack.home,
        port=port,
        nats=stack.nats,
        database_url=stack.database_url,
        name="gateway-traced",
        env={"MP_OTEL_EXPORTER": f"jsonl:{spans / 'gateway.jsonl'}"},
    )
    daemon = spawn_daemon(
        stack.home,
        nats=stack.nats,
        provider_id=TRACED_PROVIDER,
        model_id=TRACED_MODEL,
        model_path=stack.model_path,
        env={"MP_HEARTBEAT_S": "0.5", "MP_OTEL_EXPORTER": f"jsonl:{spans / 'daemon.jsonl'}"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_model(base, TRACED_MODEL, timeout=120, daemon=daemon)
        yield Traced(base, gateway, daemon, spans / "gateway.jsonl", spans / "daemon.jsonl")
    finally:
        daemon.stop()
        gateway.stop()


def _spans(path: Path, want: int, **match: Any) -> list[dict[str, Any]]:
    """At least `want` spans whose attributes match, waiting (up to 10 s) for the processes to write them."""
    deadline = time.monotonic() + 10.0
    while True:
        found = []
        if path.exists():
            for line in path.read_text().splitlines():
                span = json.loads(line)
                if all(span["attributes"].get(k) == v for k, v in match.items()):
                    found.append(span)
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_one_request_is_one_trace_from_gateway_to_daemon(traced: Traced, stack: Stack) -> None:
    r = _chat(traced.base_url, stack.api_key, model=TRACED_MODEL, max_tokens=5, stream=True)
    assert r.status_code == 200, r.text
    request_id = r.headers["x-request-id"]

    gateway = _spans(traced.gateway_spans, 2, **{"mp.request_id": request_id})
    (root,) = [s for s in gateway if s["name"] == "chat_completion"]
    (dispatch,) = [s for s in gateway if s["name"] == "dispatch"]
    assert root["parent_span_id"] is None
    assert root["service"] == "mac-provider-gateway"
    assert root["attributes"]["mp.outcome"] == "ok"
    assert root["attributes"]["mp.provider"] == TRACED_PROVIDER
    assert dispatch["parent_span_id"] == root["span_id"]
    assert dispatch["trace_id"] == root["trace_id"]
    assert dispatch["attributes"]["mp.provider"] == TRACED_PROVIDER

    (work,) = _spans(traced.daemon_spans, 1, **{"mp.request_id": request_id})
    assert work["name"] == "work"
    assert work["service"] == "mac-provider-daemon"
    assert work["trace_id"] == root["trace_id"], "the trace crossed NATS"
    assert work["parent_span_id"] == dispatch["span_id"]
    children = {s["name"]: s for s in _spans(traced.daemon_spans, 3) if s["parent_span_id"] == work["span_id"]}
    assert set(children) == {"prepare", "queue_wait", "generate"}
    assert all(s["trace_id"] == root["trace_id"] for s in children.values())
    assert children["generate"]["attributes"]["mp.completion_tokens"] == 5
    assert children["prepare"]["end_ns"] <= children["queue_wait"]["start_ns"] <= children["generate"]["start_ns"]
    # The daemon's log line for that request names it and its trace.
    done = wait_event(traced.daemon.log_path, "request_done", request_id=request_id)
    assert done["trace_id"] == root["trace_id"]
    # And the gateway's summary line too.
    summary = wait_event(traced.gateway.log_path, "chat_completion", request_id=request_id)
    assert summary["trace_id"] == root["trace_id"]


@pytest.mark.parametrize(
    "header",
    [
        "00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # an all-zero trace id
        "00-" + "A" * 32 + "-" + "1" * 16 + "-01",  # upper case
        "ff-" + "a" * 32 + "-" + "1" * 16 + "-01",  # a version we do not speak
        "00-" + "a" * 32 + "-" + "1" * 16 + "-01-extra",
        "x" * 4000,
    ],
)
def test_a_malformed_traceparent_from_the_bus_is_ignored(traced: Traced, stack: Stack, header: str) -> None:
    request = bus_request(f"req_badtrace{abs(hash(header)) % 10**8}", TRACED_MODEL, max_tokens=2)

    async def send() -> list[Any]:
        nc = await nats.connect(control_url(stack.nats))
        try:
            reply = subjects.reply(TRACED_PROVIDER, "testgw", request.request_id)
            frames: list[Any] = []
            done = asyncio.Event()

            async def on_frame(msg: Any) -> None:
                frames.append(bus.decode_frame(msg.data))
                if isinstance(frames[-1], bus.Done | bus.Failed):
                    done.set()

            await nc.subscribe(reply, cb=on_frame)
            await nc.publish(
                subjects.work(TRACED_PROVIDER), bus.encode(request), reply=reply, headers={"traceparent": header}
            )
            await asyncio.wait_for(done.wait(), 30)
            return frames
        finally:
            await nc.close()

    frames = asyncio.run(send())
    assert isinstance(frames[-1], bus.Done), frames[-1]
    (work,) = _spans(traced.daemon_spans, 1, **{"mp.request_id": request.request_id})
    assert work["parent_span_id"] is None, "the daemon started a trace of its own"
    assert work["trace_id"] not in header.lower()
    done = wait_event(traced.daemon.log_path, "request_done", request_id=request.request_id)
    assert done["trace_id"] == work["trace_id"]


def test_with_traces_off_no_line_names_a_trace(stack: Stack) -> None:
    # The session's gateway runs without MP_OTEL_EXPORTER: its log lines name no trace, and the stack's
    # daemon (same) answers a request whose gateway sent no traceparent with no trace id in its log.
    r = _chat(stack.base_url, stack.api_key, max_tokens=2)
    assert r.status_code == 200
    request_id = r.headers["x-request-id"]
    summary = wait_event(stack.gateway.log_path, "chat_completion", request_id=request_id)
    assert "trace_id" not in summary
    done = wait_event(stack.daemon.log_path, "request_done", request_id=request_id)
    assert "trace_id" not in done
    assert done["request_id"] == request_id


# ---- settings and the header format, in process ---------------------------------------------------


def test_traceparent_parsing_is_strict() -> None:
    good = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    ctx = parse_traceparent(good)
    assert ctx is not None
    assert (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", ctx.trace_flags.sampled) == ("ab" * 16, "cd" * 8, True)
    assert parse_traceparent(good[:-2] + "00").trace_flags.sampled is False  # type: ignore[union-attr]
    for bad in (None, 42, b"00", "", good + " ", " " + good, good.replace("-", "_"), good[:-1] + "g"):
        assert parse_traceparent(bad) is None, bad
    assert remote_parent({"traceparent": good}) == ctx
    assert remote_parent({"Traceparent": good}) is None
    assert remote_parent(None) is None


def test_observability_settings_are_checked(tmp_path: Path) -> None:
    env = {"MP_HOME": str(tmp_path), "MP_SECRET_KEY": "k" * 32}
    assert Settings.from_env(env).metrics_token == "", "reading settings writes nothing"
    assert not (tmp_path / "metrics_token").exists()
    ensure_local_secrets(env)
    settings = Settings.from_env(env)
    assert settings.tracing.exporter == "none"
    assert settings.metrics_token == (tmp_path / "metrics_token").read_text().strip()
    assert len(settings.metrics_token) >= 32
    assert settings.metrics_token not in repr(settings)
    traced = Settings.from_env({**env, "MP_OTEL_EXPORTER": "jsonl:spans.jsonl", "MP_OTEL_SAMPLE_RATIO": "0.5"})
    assert traced.tracing.jsonl_path is not None
    assert traced.tracing.jsonl_path.is_absolute()
    for key, raw in (
        ("MP_OTEL_EXPORTER", "zipkin"),
        ("MP_OTEL_EXPORTER", "jsonl:"),
        ("MP_OTEL_SAMPLE_RATIO", "2"),
        ("MP_OTEL_ENDPOINT", "collector:4318"),
        ("MP_METRICS_TOKEN", "short"),
    ):
        with pytest.raises(SettingsError, match=key):
            Settings.from_env({**env, key: raw})
    with pytest.raises(DaemonSettingsError, match="MP_OTEL_EXPORTER"):
        DaemonSettings.from_env({"MP_STATE_DIR": str(tmp_path / "d"), "MP_OTEL_EXPORTER": "nope"})
