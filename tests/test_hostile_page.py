"""A hostile web page in the Mac owner's browser cannot drive, read or repoint the daemon.

The page can send requests to 127.0.0.1 (simple cross-site requests need no CORS
preflight) and, by DNS rebinding, send them under its own domain as Host. Against the
session daemon (`stack.daemon`): every such request is refused with the right status in
its API's envelope, never reaches the engine, and the honest owner's curl-like requests
(no Origin, JSON) keep working with the same model loaded.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.admin.model_folder import ModelFolderRefused, resolve_model_folder
from daemon.admin.token import AdminTokenError, ensure_admin_token, read_admin_token
from daemon.http_guard import _loopback_host
from infra.components import DaemonChild, wait_http
from infra.ports import free_port
from schemas.redact import redact_url
from tests.support import logs, rawhttp
from tests.support.daemons import spawn_daemon, status
from tests.support.stack import TINY_MODEL, Stack
from tests.support.tiny_model import write_tiny_model

CHAT = json.dumps({"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
JSON = (b"Content-Type", b"application/json")
EVIL = b"https://evil.example"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _openai_error(r: rawhttp.RawResponse, status: int, code: str) -> None:
    assert r.status == status, (r.status, r.body)
    assert r.headers["content-type"].startswith("application/json")
    error: Any = r.json()
    assert error["error"]["code"] == code, error
    assert error["error"]["message"]
    assert "access-control-allow-origin" not in r.headers


def _detail(r: rawhttp.RawResponse, status: int, contains: str) -> str:
    assert r.status == status, (r.status, r.body)
    body: Any = r.json()
    assert set(body) == {"detail"}, body
    assert contains.lower() in body["detail"].lower(), body
    assert "access-control-allow-origin" not in r.headers
    return str(body["detail"])


def _bearer(daemon: DaemonChild) -> tuple[bytes, bytes]:
    return (b"Authorization", daemon.admin_headers()["Authorization"].encode())


# ---- the attacks, against the session daemon -------------------------------------------------


@pytest.fixture
def outside_model(tmp_path: Path) -> Path:
    """A real, loadable model folder outside the daemon's models folder."""
    return write_tiny_model(tmp_path / "outside-model", seed=5)


def test_a_hostile_page_cannot_drive_or_read_the_daemon(stack: Stack, outside_model: Path) -> None:
    d = stack.daemon
    api, admin = d.api_url, d.admin_url
    rebound_api = f"evil.example:{_port(api)}".encode()
    rebound_admin = f"evil.example:{_port(admin)}".encode()
    before = status(d)
    assert before["model"]["name"] == TINY_MODEL
    served_before = len(logs.events(d.log_path, "local_request_done"))
    chat = f"{api}/v1/chat/completions"

    # The local OpenAI API: OpenAI envelope.
    for origin in (EVIL, b"null", b"http://127.0.0.1:1", b"http://localhost"):
        _openai_error(rawhttp.request(chat, "POST", [JSON, (b"Origin", origin)], CHAT), 403, "cross_origin_refused")
    # A fetch() with mode no-cors sends Sec-Fetch-Site even where it sends no Origin.
    no_cors = [(b"Sec-Fetch-Site", b"cross-site"), (b"Sec-Fetch-Mode", b"no-cors")]
    _openai_error(rawhttp.request(f"{api}/v1/models", "GET", no_cors), 403, "cross_origin_refused")
    # DNS rebinding: the page's own domain resolves to 127.0.0.1, so it can read what it gets.
    _openai_error(rawhttp.request(f"{api}/v1/models", "GET", [], host=rebound_api), 421, "host_not_allowed")
    _openai_error(rawhttp.request(chat, "POST", [JSON], CHAT, host=rebound_api), 421, "host_not_allowed")
    _openai_error(rawhttp.request(f"{api}/health", "GET", [], host=b"127.0.0.1.evil.example"), 421, "host_not_allowed")
    _openai_error(rawhttp.request(f"{api}/health", "GET", [], host=b"127.0.0.1:1"), 421, "host_not_allowed")
    missing = rawhttp.request(f"{api}/health", "GET", [], host=b"")
    assert missing.status in (400, 421), missing.body  # the HTTP parser may refuse it before we do
    # Simple cross-site requests (no preflight): text/plain, a form, no Content-Type at all.
    for content_type in (b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x"):
        r = rawhttp.request(chat, "POST", [(b"Content-Type", content_type)], CHAT)
        _openai_error(r, 415, "unsupported_media_type")
    _openai_error(rawhttp.request(chat, "POST", [], CHAT), 415, "unsupported_media_type")
    # A preflight from the page gets no CORS grant.
    preflight = [(b"Origin", EVIL), (b"Access-Control-Request-Method", b"POST")]
    _openai_error(rawhttp.request(chat, "OPTIONS", preflight), 403, "cross_origin_refused")

    # The admin API: {"detail"} envelope, and the token.
    unload = f"{admin}/admin/unload"
    assert "Authorization: Bearer" in _detail(rawhttp.request(unload, "POST", [JSON]), 401, "admin token")
    r = rawhttp.request(unload, "POST", [JSON, (b"Authorization", b"Bearer " + b"x" * 43)])
    _detail(r, 401, "invalid admin token")
    assert r.headers["www-authenticate"].startswith("Bearer")
    _detail(rawhttp.request(unload, "POST", [JSON, (b"Authorization", b"Basic eDp4")]), 401, "invalid admin token")
    _detail(rawhttp.request(f"{admin}/admin/status", "GET", []), 401, "admin token")
    token = _bearer(d)
    # Even with the token (a page cannot know it, but it is one lock of several):
    _detail(rawhttp.request(unload, "POST", [token, (b"Content-Type", b"text/plain")]), 415, "application/json")
    _detail(rawhttp.request(unload, "POST", [token]), 415, "application/json")
    _detail(rawhttp.request(unload, "POST", [token, JSON, (b"Origin", EVIL)]), 403, "another site")
    _detail(rawhttp.request(unload, "POST", [token, JSON, (b"Origin", b"null")]), 403, "another site")
    _detail(rawhttp.request(f"{admin}/admin/status", "GET", [token], host=rebound_admin), 421, "127.0.0.1")
    # /admin/health needs no token, but a rebinding page cannot read it either.
    _detail(rawhttp.request(f"{admin}/admin/health", "GET", [], host=rebound_admin), 421, "127.0.0.1")

    # Loads are confined to the models folder (the token holder may not point it anywhere).
    def load(model_path: str) -> rawhttp.RawResponse:
        query = httpx.QueryParams({"model_path": model_path})
        return rawhttp.request(f"{admin}/admin/load?{query}", "POST", [token, JSON])

    _detail(load(str(outside_model)), 403, "inside the models folder")
    _detail(load("../" * 8 + str(outside_model).lstrip("/")), 400, "'..'")
    _detail(load(f"{TINY_MODEL}/../../{outside_model.parent.name}"), 400, "'..'")
    _detail(load(""), 400, "model_path")
    escape = stack.home / "models" / f"escape-{os.getpid()}"
    escape.symlink_to(outside_model, target_is_directory=True)
    try:
        _detail(load(escape.name), 403, "symlink")
        _detail(load(str(escape)), 403, "symlink")
    finally:
        escape.unlink()

    # Nothing the page sent reached the engine; the owner's own requests still work.
    honest = httpx.post(chat, content=CHAT, headers={"Content-Type": "application/json; charset=utf-8"}, timeout=30)
    assert honest.status_code == 200, honest.text
    assert honest.json()["model"] == TINY_MODEL
    assert "access-control-allow-origin" not in honest.headers
    own = rawhttp.request(chat, "POST", [JSON, (b"Origin", f"http://127.0.0.1:{_port(api)}".encode())], CHAT)
    assert own.status == 200, own.body
    by_name = rawhttp.request(f"{api}/v1/models", "GET", [], host=f"localhost:{_port(api)}".encode())
    assert [m["id"] for m in by_name.json()["data"]] == [TINY_MODEL]  # type: ignore[index]
    assert rawhttp.request(f"{api}/v1/models", "GET", [], host=b"[::1]").status == 200
    assert rawhttp.request(f"{api}/v1/models", "GET", [(b"Sec-Fetch-Site", b"none")]).status == 200
    assert httpx.get(f"{admin}/admin/health", timeout=10).json()["worker_status"] == "healthy"
    served = logs.events(d.log_path, "local_request_done")[served_before:]
    assert len(served) == 2, served
    after = status(d)
    assert after["model"]["name"] == TINY_MODEL
    assert after["model"]["loaded"] is True
    assert after["worker"]["pid"] == before["worker"]["pid"], "the model was never unloaded or replaced"


def test_status_answers_hold_no_secrets_or_paths(stack: Stack, tmp_path: Path) -> None:
    """A provider's NATS token in its URL stays out of /admin/status; no answer shows file paths."""
    provider = "page-creds-mac"
    password = stack.nats.provider_token(provider)
    url = stack.nats.url.replace("nats://", f"nats://{password}@")
    d = spawn_daemon(tmp_path, nats=url, provider_id=provider, model_id="page-synthetic", engine="synthetic")
    try:
        wait_http(f"{d.admin_url}/admin/health", timeout=60, child=d)
        body = httpx.get(f"{d.admin_url}/admin/status", headers=d.admin_headers(), timeout=10)
        assert body.status_code == 200
        assert body.json()["pool"]["nats_url"] == redact_url(url) != url
        assert password not in body.text
    finally:
        d.stop()
    # The session daemon's answers name the model by id, never by folder.
    sd = stack.daemon
    admin = {**sd.admin_headers()}
    for answer in (
        httpx.get(f"{sd.admin_url}/admin/status", headers=admin, timeout=10),
        httpx.get(f"{sd.admin_url}/admin/fit", headers=admin, timeout=10),
        httpx.get(f"{sd.admin_url}/admin/health", timeout=10),
        httpx.get(f"{sd.api_url}/health", timeout=10),
        httpx.get(f"{sd.api_url}/v1/models", timeout=10),
    ):
        assert answer.status_code == 200, answer.text
        assert str(stack.home) not in answer.text, answer.text


# ---- units -----------------------------------------------------------------------------------


def test_the_admin_token_file_is_born_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state" / "admin-token"

    def no_chmod(*args: object, **kwargs: object) -> None:
        raise AssertionError("the token file must be created 0600, not chmod-ed afterwards")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    old_umask = os.umask(0)  # a permissive umask must not widen it
    try:
        token = ensure_admin_token(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_uid == os.getuid()
    assert len(token) >= 32
    assert ensure_admin_token(path) == token == read_admin_token(path)  # made once, then reused
    assert os.listdir(path.parent) == ["admin-token"]  # no temporary file left behind

    # Daemons sharing a folder starting together agree on one token, never read a half-written one.
    shared = tmp_path / "shared" / "admin-token"
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(ensure_admin_token(shared))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8
    assert len(set(got)) == 1


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_token_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "admin-token"
    ensure_admin_token(path)
    path.chmod(mode)
    with pytest.raises(AdminTokenError, match=r"readable by others.*chmod 600"):
        ensure_admin_token(path)


def test_a_token_file_that_is_not_plainly_ours_is_refused(tmp_path: Path) -> None:
    private = tmp_path / "private"
    ensure_admin_token(private)
    link = tmp_path / "link"
    link.symlink_to(private)
    with pytest.raises(AdminTokenError, match="symlink"):
        ensure_admin_token(link)
    empty = tmp_path / "empty"
    empty.touch(mode=0o600)
    with pytest.raises(AdminTokenError, match="no usable token"):
        ensure_admin_token(empty)
    if os.getuid() == 0:  # only root can give a file away
        theirs = tmp_path / "theirs"
        ensure_admin_token(theirs)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(AdminTokenError, match="belongs to uid 65534"):
            ensure_admin_token(theirs)


def test_the_daemon_refuses_to_start_with_a_readable_token_file(tmp_path: Path) -> None:
    path = tmp_path / "admin-token"
    path.write_text("x" * 43 + "\n")
    path.chmod(0o644)
    env = {**os.environ, "MP_ADMIN_TOKEN_FILE": str(path), "MP_ENGINE": "synthetic", "MP_API_PORT": "0"}
    env |= {"MP_ADMIN_PORT": str(free_port()), "NATS_URL": "nats://127.0.0.1:1"}
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "readable by others" in done.stderr
    assert f"chmod 600 {path}" in done.stderr


def test_load_paths_are_confined_to_the_models_folder(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "org" / "m").mkdir(parents=True)
    (models / "a").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (models / "out").symlink_to(outside)
    (models / "in").symlink_to(models / "a")
    configured = tmp_path / "configured"

    def ok(requested: str, expected: Path) -> None:
        assert resolve_model_folder(requested, models_dir=models, configured=configured) == expected.resolve()

    def refused(requested: str, status: int) -> None:
        with pytest.raises(ModelFolderRefused) as exc:
            resolve_model_folder(requested, models_dir=models, configured=configured)
        assert exc.value.status == status, (requested, exc.value.message)

    ok("a", models / "a")
    ok("org/m", models / "org" / "m")
    ok(str(models / "a"), models / "a")
    ok("in", models / "a")  # a symlink that stays inside
    ok(str(configured), configured)  # the owner's own MP_MODEL_PATH
    refused(str(outside), 403)
    refused("out", 403)
    refused("/etc", 403)
    refused("~", 403)
    refused(".", 403)  # the models folder itself is not a model
    refused("../elsewhere", 400)
    refused("a/../../elsewhere", 400)
    refused("", 400)
    refused("a\x00b", 400)
    refused("x" * 2000, 400)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (b"127.0.0.1", True),
        (b"127.0.0.1:8000", True),
        (b"LOCALHOST:8000", True),
        (b"[::1]:8000", True),
        (b"[::1]", True),
        (b"127.0.0.1:8001", False),
        (b"127.0.0.1:", False),
        (b"evil.example:8000", False),
        (b"localhost.evil.example", False),
        (b"127.0.0.2:8000", False),
        (b"[::1]x", False),
        (b"0.0.0.0:8000", False),
        (b"", False),
    ],
)
def test_loopback_hosts(host: bytes, allowed: bool) -> None:
    assert _loopback_host(host, 8000) is allowed


def test_doctor_names_an_unusable_token_file(tmp_path: Path) -> None:
    from daemon.doctor import _admin_token
    from daemon.settings import DaemonSettings

    settings = DaemonSettings.from_env({"MP_STATE_DIR": str(tmp_path)})
    assert settings.admin_token_file == tmp_path / "admin-token"
    assert settings.models_dir == tmp_path / "models"
    assert _admin_token(settings).status == "ok"  # not made yet: the daemon makes it
    ensure_admin_token(settings.admin_token_file)
    assert _admin_token(settings).status == "ok"
    settings.admin_token_file.chmod(0o644)
    check = _admin_token(settings)
    assert check.status == "fail"
    assert "readable by others" in check.detail


def _post_scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "server": ("127.0.0.1", 11440),
        "headers": [(b"host", b"127.0.0.1:11440"), JSON, *headers],
    }


async def _through_guard(
    scope: dict[str, Any], messages: list[tuple[float, dict[str, Any]]], timeout_s: float
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """`scope` through a LocalGuard whose client sends `messages` (each after its delay, then nothing more):
    what the guard answered, and the bodies the app was handed."""
    from daemon.http_guard import LocalGuard, Refusal

    handed: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        handed.append(message["body"])
        assert not message.get("more_body")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def render(refusal: Refusal) -> bytes:
        return json.dumps({"error": {"code": refusal.code, "message": refusal.message}}).encode()

    pending = list(messages)

    async def receive() -> dict[str, Any]:
        if not pending:
            await asyncio.sleep(3600)  # a client that never sends the rest
        delay, message = pending.pop(0)
        await asyncio.sleep(delay)
        return message

    sent: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    await LocalGuard(app, render=render, body_timeout_s=timeout_s)(scope, receive, send)
    return sent, handed


def _chunk(body: bytes, more: bool, after: float = 0.0) -> tuple[float, dict[str, Any]]:
    return after, {"type": "http.request", "body": body, "more_body": more}


async def test_the_local_apis_refuse_a_body_that_never_comes_or_trickles() -> None:
    """A local program (or a page's request) that announces a body and never sends it, or sends it a byte at
    a time, gets 408 body_timeout in time and the connection closed; the route never runs."""
    never = _post_scope((b"content-length", b"100"))
    trickle = [_chunk(b"{", True, 0.1)] + [_chunk(b" ", True, 0.1) for _ in range(20)]
    for messages in ([], trickle):
        started = time.monotonic()
        sent, handed = await _through_guard(never, messages, timeout_s=0.5)
        assert 0.45 <= time.monotonic() - started < 2.0
        assert handed == []
        assert sent[0]["status"] == 408
        assert (b"connection", b"close") in sent[0]["headers"]
        assert json.loads(sent[1]["body"])["error"]["code"] == "body_timeout"


async def test_the_local_apis_refuse_a_body_past_10_mb_and_hand_a_good_one_over_whole() -> None:
    from daemon.http_guard import MAX_BODY

    # Announced too large: refused before reading a byte.
    sent, handed = await _through_guard(_post_scope((b"content-length", str(MAX_BODY + 1).encode())), [], 5.0)
    assert sent[0]["status"] == 413
    assert handed == []
    # Sent too large without a length (chunked): refused once past the limit.
    piece = b" " * (1 << 20)
    chunks = [_chunk(piece, True) for _ in range(11)]
    sent, handed = await _through_guard(_post_scope((b"transfer-encoding", b"chunked")), chunks, 5.0)
    assert sent[0]["status"] == 413
    assert handed == []
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"
    # A body in pieces reaches the route as one message, intact.
    sent, handed = await _through_guard(
        _post_scope((b"content-length", b"13")), [_chunk(b'{"a": ', True, 0.05), _chunk(b'"bcdef"}', False)], 5.0
    )
    assert handed == [b'{"a": "bcdef"}']
    assert sent[0]["status"] == 200
