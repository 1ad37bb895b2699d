"""The real local stack the benchmark talks to: nats-server, PostgreSQL, control plane(s), one daemon.

Started in a scratch directory and torn down newest first by `stop()`, which
ignores Ctrl-C/SIGTERM while it runs so that a second Ctrl-C cannot leave
children behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    """One control-plane process to start: its name (log file: logs/<name>.log) and extra environment."""

    name: str
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Gateway:
    name: str
    base_url: str
    child: Child


class BenchStack:
    """nats-server, PostgreSQL, one or more control planes on them, and one synthetic daemon."""

    def __init__(
        self,
        home: Path,
        *,
        gateway_env: Mapping[str, str] | None = None,
        gateways: Sequence[GatewaySpec] | None = None,
    ) -> None:
        self.home = home
        if gateways is None:
            gateways = [GatewaySpec("gateway", dict(gateway_env or {}))]
        elif gateway_env is not None:
            raise ValueError("pass either gateway_env (one gateway) or gateways")
        if not gateways or len({g.name for g in gateways}) != len(gateways):
            raise ValueError("at least one gateway, each with its own name")
        self.specs = list(gateways)
        self.gateways: dict[str, Gateway] = {}
        self.api_key = ""
        self.daemon: Child | None = None
        self.postgres_pid: int | None = None
        self._cleanups: list[tuple[str, Callable[[], object]]] = []

    @property
    def gateway(self) -> Child | None:
        """The first gateway's process (the only one in the default mode)."""
        first = self.gateways.get(self.specs[0].name)
        return first.child if first else None

    @property
    def base_url(self) -> str:
        first = self.gateways.get(self.specs[0].name)
        return first.base_url if first else ""

    def start(self) -> None:
        nats = NatsServer.start(self.home / "nats")
        self._cleanups.append(("nats-server", nats.stop))
        say(f"nats-server on {nats.url}")

        pg = PostgresServer.start(self.home / "postgres", fast=True)
        self._cleanups.append(("postgres", pg.stop))
        self.postgres_pid = pg.proc.pid
        say(f"postgres on {pg.url}")

        self.api_key = asyncio.run(ensure_dev_key(pg.url, self.home / "dev.env"))

        for spec in self.specs:
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            child = start_gateway(
                self.home, port=port, nats_url=nats.url, database_url=pg.url, name=spec.name, env=spec.env
            )
            self._cleanups.append((spec.name, child.stop))
            self.gateways[spec.name] = Gateway(spec.name, base_url, child)
            label = "control plane" if len(self.specs) == 1 else f"control plane {spec.name!r}"
            say(f"{label} on {base_url} (log: {child.log_path})")

        self.daemon = start_daemon(
            self.home, nats_url=nats.url, provider_id=PROVIDER_ID, model_id=MODEL_ID, engine="synthetic"
        )
        self._cleanups.append((self.daemon.name, self.daemon.stop))
        for gateway in self.gateways.values():
            wait_model(gateway.base_url, MODEL_ID, timeout=60, daemon=self.daemon)
        say(f"daemon {PROVIDER_ID} serving {MODEL_ID!r} with MP_ENGINE=synthetic (log: {self.daemon.log_path})")

    def dead_children(self) -> list[Child]:
        children = [g.child for g in self.gateways.values()]
        return [c for c in (*children, self.daemon) if c is not None and not c.alive()]

    def check_alive(self) -> None:
        """Raise (with their log tails) if a gateway or the daemon died."""
        dead = self.dead_children()
        if dead:
            tails = "\n".join(f"--- {child.name}:\n{child.log_tail()}" for child in dead)
            raise RuntimeError(f"{', '.join(c.name for c in dead)} died during the benchmark\n{tails}")

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
