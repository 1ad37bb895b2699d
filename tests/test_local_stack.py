"""The README's first command: `mac-provider up` brings everything up, Ctrl-C takes it all down."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from infra.devkey import read_env_file
from infra.ports import free_port
from tests.support.stack import TINY_MODEL

READY = "Mac Provider is up."


def _start(home: Path, port: int, model_path: Path) -> tuple[subprocess.Popen[str], list[str]]:
    env = {
        **os.environ,
        "MP_HOME": str(home),
        "MP_PORT": str(port),
        "MP_MODEL_PATH": str(model_path),
        "MP_MODEL_ID": TINY_MODEL,
        "PYTHONUNBUFFERED": "1",
    }
    # As a developer runs it: the production default refuses uncatalogued models, so this also
    # proves the stack lists its own daemon's weights in the catalog (infra/stack.py).
    for name in ("NATS_URL", "DATABASE_URL", "MP_UNCATALOGUED_MODELS"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services", "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def pump() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while not any(READY in line for line in seen):
        try:
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            proc.kill()
            pytest.fail("mac-provider up did not come up:\n" + "".join(seen))
        if proc.poll() is not None and lines.empty():
            pytest.fail("mac-provider up exited:\n" + "".join(seen))
    # The printout continues for a few lines after the banner.
    time.sleep(0.3)
    while not lines.empty():
        seen.append(lines.get())
    return proc, seen


def _stop(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(family) >= 4, "nats, postgres, gateway and daemon are children of `up`"
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(family, timeout=10)
    assert alive == [], f"left running: {alive}"


def test_up_serves_requests_and_stops_cleanly_twice(tmp_path: Path, tiny_model_path: Path) -> None:
    home = tmp_path / "mp"
    port = free_port()
    proc, output = _start(home, port, tiny_model_path)
    try:
        text = "".join(output)
        dev_env = read_env_file(home / "dev.env")
        key = dev_env["OPENAI_API_KEY"]
        assert dev_env["OPENAI_BASE_URL"] == f"http://127.0.0.1:{port}/v1"
        assert key in text, "the key is printed"
        assert "curl " in text
        client = OpenAI(base_url=dev_env["OPENAI_BASE_URL"], api_key=key, max_retries=0)
        resp = client.chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert resp.usage is not None
        assert resp.usage.completion_tokens == 3
        # The daemon's own local API (the Mac owner's, no key) is printed too, and answers.
        local = re.search(r"daemon +: (http://127\.0\.0\.1:\d+/v1)", text)
        assert local is not None, text
        local_client = OpenAI(base_url=local.group(1), api_key="unused", max_retries=0)
        assert [m.id for m in local_client.models.list()] == [TINY_MODEL]
        # The daemon's admin API: the printed line reads the token from its 0600 file, and works.
        admin = re.search(r"admin +: (curl .*/admin/status)", text)
        assert admin is not None, text
        token_file = home / "daemons" / "local-mac" / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token_file.read_text().strip() not in text, "the token itself is never printed"
        answer = subprocess.run(["bash", "-c", admin.group(1)], capture_output=True, text=True, timeout=30)
        assert json.loads(answer.stdout)["model"]["name"] == TINY_MODEL, answer
    finally:
        _stop(proc, signal.SIGINT)

    # Second run: same state folder, same key, data kept.
    proc, output = _start(home, port, tiny_model_path)
    try:
        assert read_env_file(home / "dev.env")["OPENAI_API_KEY"] == key
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        assert TINY_MODEL in [m.id for m in client.models.list()]
    finally:
        _stop(proc, signal.SIGTERM)
