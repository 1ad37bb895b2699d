"""Starting the control plane and a provider daemon as child processes.

Shared by `mac-provider up` and the tests, so the tests exercise exactly the
processes a user runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

from daemon.settings import ADMIN_TOKEN_FILE_NAME
from infra import procs
from infra.blas import fast_blas_env
from infra.nats_auth import Credentials, NatsTarget, SecuredNats, child_env
from infra.ports import free_port


@dataclass
class Child:
    name: str
    proc: Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        return procs.stop(self.proc, timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        return procs.log_tail(self.log_path, lines)


def _env(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    # Children print as they go; a buffered log hides the reason a child died.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_gateway(
    home: Path,
    *,
    port: int,
    nats: NatsTarget,
    database_url: str,
    name: str = "gateway",
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    nats_credentials: Credentials | None = None,
    services: Sequence[str] = (),
    cwd: Path | None = None,
    wrapper: Sequence[str] = (),
) -> Child:
    """Start a control plane (every service, or only `services`); on a server we launched (a SecuredNats)
    it logs in as the control plane and also answers the server's auth callout (when natsauth runs in it).

    `wrapper` goes before the command (a benchmark runs a gateway under valgrind; the pid stays the
    process's own)."""
    log_path = home / "logs" / f"{name}.log"
    proc = procs.spawn(
        [*wrapper, sys.executable, "-m", "services", "serve", *(arg for s in services for arg in ("--service", s))],
        env=_env(
            {
                "MP_HOME": str(home),
                "MP_PORT": str(port),
                **child_env(nats, credentials=nats_credentials),
                "DATABASE_URL": database_url,
                **(env or {}),
            }
        ),
        log_path=log_path,
        cwd=cwd,
    )
    child = Child(name, proc, log_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=timeout, child=child)
    except BaseException:
        child.stop()
        raise
    return child


def start_natsauth(
    home: Path,
    *,
    nats: SecuredNats,
    database_url: str,
    name: str = "natsauth",
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Child:
    """Start the auth callout alone (`mac-provider serve --service natsauth`): what lets anyone onto
    a server we launched while no control plane runs (tests of daemons and of the bus itself)."""
    return start_gateway(
        home,
        port=free_port(),
        nats=nats,
        database_url=database_url,
        name=name,
        env={"MP_DB_POOL_SIZE": "4", **(env or {})},
        timeout=timeout,
        services=["natsauth"],
    )


@dataclass
class DaemonChild(Child):
    """A provider daemon; its local admin and OpenAI-compatible APIs listen on 127.0.0.1."""

    admin_port: int = 0
    api_port: int = 0
    # The admin API's bearer token lives here (0600, made by the daemon when it starts).
    admin_token_file: Path | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def admin_headers(self) -> dict[str, str]:
        """What a call to the admin API sends: the token read from its file (checked private)."""
        from daemon.admin.token import read_admin_token

        if self.admin_token_file is None:
            raise RuntimeError(f"{self.name} has no admin token file")
        return {"Authorization": f"Bearer {read_admin_token(self.admin_token_file)}"}

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


def start_daemon(
    home: Path,
    *,
    nats: NatsTarget,
    provider_id: str,
    model_id: str,
    model_path: Path | None = None,
    engine: str = "mlx",
    env: Mapping[str, str] | None = None,
    admin_port: int | None = None,
    api_port: int | None = None,
    nats_credentials: Credentials | None = None,
) -> DaemonChild:
    """Start a daemon; its local ports are free ones unless given (several daemons share one machine).

    On a server we launched (a SecuredNats), the daemon presents its own provider token
    (minted in Postgres now if it is new), which the auth callout checks. Its state folder (admin token) is
    `home/daemons/<provider_id>`; its models folder, where /admin/load may load from, is
    `home/models` (where `mac-provider up` and the tests put models), unless `env` says otherwise.
    """
    log_path = home / "logs" / f"daemon-{provider_id}.log"
    admin_port = free_port() if admin_port is None else admin_port
    # Two lookups in a row can get the same port back from the kernel: never give both listeners one.
    api_port = free_port(avoid={admin_port}) if api_port is None else api_port
    settings = {
        **fast_blas_env(),
        **child_env(nats, provider_id=provider_id, credentials=nats_credentials),
        "MP_PROVIDER_ID": provider_id,
        "MP_MODEL_ID": model_id,
        "MP_ENGINE": engine,
        "MP_ADMIN_PORT": str(admin_port),
        "MP_API_PORT": str(api_port),
        **({"MP_MODEL_PATH": str(model_path)} if model_path else {}),
        "MP_STATE_DIR": str(home / "daemons" / provider_id),
        "MP_MODELS_DIR": str(home / "models"),
        **(env or {}),
    }
    token_file = Path(settings.get("MP_ADMIN_TOKEN_FILE") or Path(settings["MP_STATE_DIR"]) / ADMIN_TOKEN_FILE_NAME)
    proc = procs.spawn([sys.executable, "-m", "daemon", "serve"], env=_env(settings), log_path=log_path)
    return DaemonChild(
        f"daemon-{provider_id}",
        proc,
        log_path,
        admin_port=admin_port,
        api_port=api_port,
        admin_token_file=token_file.expanduser(),
    )


def get_json(url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> tuple[int, object]:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_http(url: str, *, timeout: float, child: Child | None = None) -> None:
    """Until `url` answers 200; fails fast (with the log) if `child` dies."""
    deadline = time.monotonic() + timeout
    while True:
        if child is not None and not child.alive():
            raise procs.ProcessExitedError(f"{child.name} exited while starting; log tail:\n{child.log_tail()}")
        try:
            status, _ = get_json(url, timeout=2.0)
            if status == 200:
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            tail = child.log_tail() if child else ""
            raise TimeoutError(f"{url} not ready after {timeout:.0f}s\n{tail}")
        time.sleep(0.05)


def wait_model(base_url: str, model_id: str, *, timeout: float, daemon: Child | None = None) -> None:
    """Until the public status page shows `model_id` served by the pool."""
    deadline = time.monotonic() + timeout
    while True:
        if daemon is not None and not daemon.alive():
            raise procs.ProcessExitedError(f"{daemon.name} exited while starting; log tail:\n{daemon.log_tail()}")
        try:
            status, body = get_json(f"{base_url}/v1/status", timeout=2.0)
            if status == 200 and isinstance(body, dict) and any(m["id"] == model_id for m in body["models"]):
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            tail = daemon.log_tail() if daemon else ""
            raise TimeoutError(f"model {model_id} not served after {timeout:.0f}s\n{tail}")
        time.sleep(0.1)
