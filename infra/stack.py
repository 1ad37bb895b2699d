"""`just up`: the whole system on one machine, in a state folder (`MP_HOME`, default ./.mp).

Starts NATS and PostgreSQL (unless NATS_URL / DATABASE_URL point elsewhere),
applies migrations, makes the dev account and key, starts the control plane
on MP_PORT (default 8080) and one provider daemon serving SmolLM2. Ctrl-C or
SIGTERM stops everything it started, newest first. A second run reuses the
state folder, so data survives restarts.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import nats as nats_client

from infra import procs
from infra.components import Child, DaemonChild, start_daemon, start_gateway, wait_model
from infra.devkey import ensure_dev_key, write_dev_env
from infra.nats_auth import NatsTarget, SecuredNats
from infra.ports import free_port
from infra.postgres import PostgresServer
from schemas import env as env_vars
from schemas.private_file import write_private
from schemas.redact import redact_url
from services.catalog.admin import trust
from services.providers import store as providers


@dataclass(frozen=True)
class StackSettings:
    """What `mac-provider up` takes from the environment, read once (the services read their own)."""

    home: Path
    port: int
    # Fixed ports for the servers it starts (None: free ones), or servers elsewhere (their URLs).
    pg_port: int | None
    nats_port: int | None
    database_url: str | None
    nats_url: str | None
    # As the control plane on a NATS elsewhere (the stack's own NATS makes its own user).
    nats_user: str | None
    nats_password: str | None
    provider_id: str
    model_path: Path | None
    model_id: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StackSettings:
        def port(name: str) -> int | None:
            value = env_vars.integer(env, name, 0)
            if not 0 <= value < 65536:
                raise env_vars.EnvError(f"{name} must be a TCP port, got {value}")
            return value or None

        model_path = env.get("MP_MODEL_PATH")
        return cls(
            home=Path(env.get("MP_HOME", ".mp")).expanduser().resolve(),
            port=port("MP_PORT") or 8080,
            pg_port=port("MP_PG_PORT"),
            nats_port=port("MP_NATS_PORT"),
            database_url=env.get("DATABASE_URL") or None,
            nats_url=env.get("NATS_URL") or None,
            nats_user=env.get("MP_NATS_USER") or None,
            nats_password=env.get("MP_NATS_PASSWORD") or None,
            provider_id=env.get("MP_PROVIDER_ID", "local-mac"),
            model_path=Path(model_path).resolve() if model_path else None,
            model_id=env.get("MP_MODEL_ID") or None,
        )


def _say(message: str) -> None:
    print(f"[mac-provider] {message}", flush=True)


def _write_admin_env(path: Path, values: dict[str, str]) -> None:
    """What `mac-provider admin ...` needs to reach this stack (it holds the control plane's NATS password)."""
    lines = [f"# Written by `just up`. Load with: set -a; . {path}; set +a\n"]
    lines += [f"{name}={value}\n" for name, value in values.items()]
    write_private(path, "".join(lines))


async def pin_provider(database_url: str, provider_id: str) -> None:
    """The stack's own daemon is admitted at once, whatever the provisional rate."""
    conn = await asyncpg.connect(database_url)
    try:
        await providers.set_status(conn, provider_id, "pinned", "the local stack's own daemon")
    finally:
        await conn.close()


async def _trust_once(database_url: str, nats_url: str, nats_env: dict[str, str], provider_id: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    # As the control plane: the stack's own NATS user, or the one the environment named.
    nc = await nats_client.connect(
        nats_url,
        user=nats_env.get("MP_NATS_USER") or None,
        password=nats_env.get("MP_NATS_PASSWORD") or None,
        allow_reconnect=False,
        connect_timeout=5,
    )
    try:
        listed = await trust(
            conn, nc, provider_id, None, added_by="mac-provider up", note="the local stack's own daemon", wait_s=2.0
        )
        return [f"{m.id} = {m.weights_sha256}" for m, _ in listed or []]
    finally:
        await nc.close()
        await conn.close()


def trust_own_daemon(
    database_url: str, nats_url: str, nats_env: dict[str, str], provider_id: str, daemon: DaemonChild, timeout: float
) -> list[str]:
    """List the weights the stack's own (pinned) daemon serves in the catalog, as `admin models trust` does.

    Gateways refuse model ids the catalog does not list (MP_UNCATALOGUED_MODELS=refuse), so
    `just up` vouches for its own daemon's model once the daemon reports its weights hash.
    """
    deadline = time.monotonic() + timeout
    while True:
        if not daemon.alive():
            raise procs.ProcessExitedError(f"{daemon.name} exited while starting; log tail:\n{daemon.log_tail()}")
        listed = asyncio.run(_trust_once(database_url, nats_url, nats_env, provider_id))
        if listed:
            return listed
        if time.monotonic() > deadline:
            raise TimeoutError(f"{daemon.name} reported no weights hash within {timeout:.0f}s\n{daemon.log_tail()}")


def main() -> int:
    try:
        settings = StackSettings.from_env(os.environ)
    except env_vars.EnvError as exc:
        _say(str(exc))
        return 2
    home, port = settings.home, settings.port
    host = "127.0.0.1"
    base = f"http://{host}:{port}"
    home.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    cleanups: list[Callable[[], object]] = []
    admin_env: dict[str, str] = {}
    # A NATS elsewhere: the control plane's user, if the environment names one.
    nats_login = {"MP_NATS_USER": settings.nats_user or "", "MP_NATS_PASSWORD": settings.nats_password or ""}
    children: list[Child] = []
    exit_code = 0
    try:
        database_url = settings.database_url
        if not database_url:
            # Free ports for the servers started first must not be the one the control plane was promised.
            pg = PostgresServer.start(home / "postgres", port=settings.pg_port or free_port(avoid={port}))
            cleanups.append(pg.stop)
            database_url = pg.url
            _say(f"postgres on {redact_url(database_url)}")
        nats_url = settings.nats_url
        target: NatsTarget = nats_url or ""
        if not nats_url:
            # The auth callout on: the control plane (which answers it) logs in with its password,
            # the daemon with a provider token minted in Postgres; the server's config names no
            # provider (secrets in $MP_HOME/nats/credentials.json, 0600).
            nats_port = settings.nats_port or free_port(avoid={port, urlsplit(database_url).port or 0})
            nats = SecuredNats.start(home / "nats", port=nats_port, database_url=database_url)
            cleanups.append(nats.stop)
            nats_url, target = nats.url, nats
            admin_env.update(nats.gateway.env())
            _say(
                f"nats-server on {redact_url(nats_url)} (auth callout; secrets: {nats.state_dir / 'credentials.json'})"
            )

        dev_env = home / "dev.env"
        key = asyncio.run(ensure_dev_key(database_url, dev_env))
        provider_id = settings.provider_id
        asyncio.run(pin_provider(database_url, provider_id))
        _write_admin_env(home / "admin.env", {"DATABASE_URL": database_url, "NATS_URL": nats_url, **admin_env})

        if settings.model_path is not None:
            model_path = settings.model_path
            model_id = settings.model_id or model_path.name
        else:
            from daemon.models.smollm2 import MODEL_ID, ensure_smollm2

            _say("preparing the default model (SmolLM2-135M-Instruct; first run converts the GGUF once)")
            model_path = ensure_smollm2(home / "models")
            model_id = settings.model_id or MODEL_ID

        gateway = start_gateway(home, port=port, nats=target, database_url=database_url)
        children.append(gateway)
        _say(f"control plane on {base} (log: {gateway.log_path})")
        daemon = start_daemon(
            home,
            nats=target,
            provider_id=provider_id,
            model_id=model_id,
            model_path=model_path,
        )
        children.append(daemon)
        _say(f"provider daemon loading {model_id} (log: {daemon.log_path})")
        for line in trust_own_daemon(
            database_url, nats_url, {**nats_login, **admin_env}, provider_id, daemon, timeout=300
        ):
            _say(f"model catalog: {line} (trusted from {provider_id})")
        wait_model(base, model_id, timeout=300, daemon=daemon)
        write_dev_env(dev_env, base_url=f"{base}/v1", key=key)

        # The daemon's admin token stays in its 0600 file: the line reads it, nothing prints it.
        token_file = shlex.quote(str(daemon.admin_token_file))
        payload = json.dumps(
            {"model": model_id, "messages": [{"role": "user", "content": "What is the capital of France?"}]},
            separators=(",", ":"),
        )
        print(
            f"""
Mac Provider is up.
  website  : {base}/  (docs, status, demo: {base}/docs {base}/status {base}/demo)
  base URL : {base}/v1
  API key  : {key}
  model    : {model_id}
  env file : {dev_env}   (set -a; . {dev_env}; set +a)
  operator : set -a; . {home / "admin.env"}; set +a; mac-provider admin providers list
  daemon   : {daemon.api_url}/v1 (the Mac owner's own OpenAI API, no key)
  admin    : curl -H "Authorization: Bearer $(cat {token_file})" {daemon.admin_url}/admin/status

  curl {base}/v1/chat/completions \\
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{payload}'

Ctrl-C stops everything.""",
            flush=True,
        )
        while not stop.wait(0.5):
            for child in children:
                if not child.alive():
                    _say(f"{child.name} exited unexpectedly; log tail:\n{child.log_tail()}")
                    exit_code = 1
                    stop.set()
    except Exception as exc:
        _say(f"failed to start: {redact_url(str(exc))}")
        exit_code = 1
    finally:
        _say("stopping")
        # Signals during shutdown must not interrupt it halfway.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        started = time.monotonic()
        for child in reversed(children):
            child.stop()
        for cleanup in reversed(cleanups):
            cleanup()
        _say(f"stopped in {time.monotonic() - started:.1f}s")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
