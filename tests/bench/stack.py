"""The real local stack the benchmark talks to: nats-server, PostgreSQL, control plane, one daemon.

Started in a scratch directory and torn down newest first by `stop()`, which
ignores Ctrl-C/SIGTERM while it runs so that a second Ctrl-C cannot leave
children behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.components import Child, start_daemon, start_gateway, wait_model
from infra.devkey import ensure_dev_key
from infra.nats import NatsServer
from infra.ports import free_port
from infra.postgres import PostgresServer

MODEL_ID = "synthetic"
PROVIDER_ID = "bench-synthetic"

# Quotas stay on (their bookkeeping is part of the gateway's cost per request),
# but the one benchmark key must not be refused: the product's default per-account
# concurrency (16) is below the benchmark's top concurrency level.
RAISED_QUOTAS = {
    "MP_QUOTA_CONCURRENT": "1000000",
    "MP_QUOTA_REQUESTS_PER_DAY": "1000000000",
    "MP_QUOTA_TOKENS_PER_DAY": "1000000000000",
}


def say(message: str) -> None:
    """Progress goes to stderr; stdout carries only the table."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class BenchStack:
    def __init__(self, home: Path, *, gateway_env: dict[str, str] | None = None) -> None:
        self.home = home
        self.gateway_env = gateway_env or {}
        self.base_url = ""
        self.api_key = ""
        self.gateway: Child | None = None
        self.daemon: Child | None = None
        self._cleanups: list[tuple[str, Callable[[], object]]] = []

    def start(self) -> None:
        nats = NatsServer.start(self.home / "nats")
        self._cleanups.append(("nats-server", nats.stop))
        say(f"nats-server on {nats.url}")

        pg = PostgresServer.start(self.home / "postgres", fast=True)
        self._cleanups.append(("postgres", pg.stop))
        say(f"postgres on {pg.url}")

        self.api_key = asyncio.run(ensure_dev_key(pg.url, self.home / "dev.env"))

        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.gateway = start_gateway(self.home, port=port, nats_url=nats.url, database_url=pg.url, env=self.gateway_env)
        self._cleanups.append(("gateway", self.gateway.stop))
        say(f"control plane on {self.base_url} (log: {self.gateway.log_path})")

        self.daemon = start_daemon(
            self.home, nats_url=nats.url, provider_id=PROVIDER_ID, model_id=MODEL_ID, engine="synthetic"
        )
        self._cleanups.append((self.daemon.name, self.daemon.stop))
        wait_model(self.base_url, MODEL_ID, timeout=60, daemon=self.daemon)
        say(f"daemon {PROVIDER_ID} serving {MODEL_ID!r} with MP_ENGINE=synthetic (log: {self.daemon.log_path})")

    def dead_children(self) -> list[Child]:
        return [c for c in (self.gateway, self.daemon) if c is not None and not c.alive()]

    def stop(self) -> None:
        """Stop everything started so far, newest first. Idempotent; never raises."""
        if not self._cleanups:
            return
        previous: dict[signal.Signals, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            while self._cleanups:
                name, stop = self._cleanups.pop()
                try:
                    stop()
                except Exception as exc:
                    say(f"stopping {name} failed: {exc!r}")
        finally:
            for sig, handler in previous.items():
                with contextlib.suppress(Exception):
                    signal.signal(sig, handler)
        say("stack stopped")
