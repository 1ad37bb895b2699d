"""A daemon whose coordinator is unreachable still stops at once when told (launchd kills after 20 s)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from infra.ports import free_port


def test_sigterm_stops_a_daemon_that_never_reached_nats(tmp_path: Path) -> None:
    dead_port = free_port()  # nothing listens there
    env = {
        **os.environ,
        "NATS_URL": f"nats://127.0.0.1:{dead_port}",
        "MP_ENGINE": "synthetic",
        "MP_API_PORT": "0",
        "MP_ADMIN_PORT": "0",
        "MP_PROVIDER_ID": "offline-mac",
        "MP_STATE_DIR": str(tmp_path),
    }
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 30
            while b"nats_error" not in log.read_bytes():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            time.sleep(1.0)  # a few reconnect attempts
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "stopped before connecting" in text
    # One line per kind of error a minute, not a traceback per attempt.
    assert "Traceback" not in text
    assert text.count("nats_error") == 1
