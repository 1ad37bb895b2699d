"""The servers every benchmark stack runs: nats-server, PostgreSQL and control plane(s), in a scratch directory.

Subclasses add their daemons (synthetic.py, pool.py). Everything is torn down
newest first by `stop()`, which ignores Ctrl-C/SIGTERM while it runs so that a
second Ctrl-C cannot leave children behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.components import Child, start_gateway
from infra.devkey import ensure_dev_key
from infra.nats import NatsServer
from infra.ports import free_port
from infra.postgres import PostgresServer
from tests.bench.progress import say

# Quotas stay on (their bookkeeping is part of the gateway's cost per request),
# but the one benchmark key must not be refused: the product's default per-account
# concurrency (16) is below the benchmark's top concurrency level.
RAISED_QUOTAS = {
    "MP_QUOTA_CONCURRENT": "1000000",
    "MP_QUOTA_REQUESTS_PER_DAY": "1000000000",
    "MP_QUOTA_TOKENS_PER_DAY": "1000000000000",
}


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    """One control-plane process to start: its name (log file: logs/<name>.log) and extra environment."""

    name: str
    env: Mapping[str, str] = field(default_factory=dict)
    # Where it runs from: `python -m services` imports the code there (a worktree of another commit).
    cwd: Path | None = None
    # What runs it (valgrind for `versus --instructions`), and how long it may take to answer /health.
    wrapper: tuple[str, ...] = ()
    start_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Gateway:
    name: str
    base_url: str
    child: Child


class Stack(ABC):
    """nats-server, PostgreSQL and the given control planes; `start_daemons` adds the providers."""

    def __init__(self, home: Path, gateways: Sequence[GatewaySpec]) -> None:
        if not gateways or len({g.name for g in gateways}) != len(gateways):
            raise ValueError("at least one gateway, each with its own name")
        self.home = home
        self.gateway_specs = list(gateways)
        self.gateways: dict[str, Gateway] = {}
        self.api_key = ""
        self.nats_url = ""
        self.postgres_pid: int | None = None
        self.nats_pid: int | None = None
        self.database_url = ""
        self._cleanups: list[tuple[str, Callable[[], object]]] = []
        # PostgreSQL without fsync (the tests' setting) unless a benchmark measures the durable cost of
        # writes on the request path: a production server flushes its WAL at every commit.
        self.durable_postgres = False

    def start(self) -> None:
        nats = NatsServer.start(self.home / "nats")
        self.on_stop("nats-server", nats.stop)
        self.nats_url = nats.url
        self.nats_pid = nats.proc.pid
        say(f"nats-server on {nats.url}")

        pg = PostgresServer.start(self.home / "postgres", fast=not self.durable_postgres)
        self.on_stop("postgres", pg.stop)
        self.postgres_pid = pg.proc.pid
        self.database_url = pg.url
        say(f"postgres on {pg.url}")
        self.api_key = asyncio.run(ensure_dev_key(pg.url, self.home / "dev.env"))

        for spec in self.gateway_specs:
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            child = start_gateway(
                self.home,
                port=port,
                nats=nats.url,
                database_url=pg.url,
                name=spec.name,
                # The synthetic engine is no model and has no weights hash to catalogue.
                env={"MP_UNCATALOGUED_MODELS": "allow", **spec.env},
                cwd=spec.cwd,
                wrapper=spec.wrapper,
                timeout=spec.start_timeout_s,
            )
            self.on_stop(spec.name, child.stop)
            self.gateways[spec.name] = Gateway(spec.name, base_url, child)
            say(f"{self.gateway_label(spec)} on {base_url} (log: {child.log_path})")
        self.start_daemons()

    @abstractmethod
    def start_daemons(self) -> None:
        """Start the providers (their NATS: `nats_url`) and wait until every gateway's pool holds them."""

    def gateway_label(self, spec: GatewaySpec) -> str:
        return f"control plane {spec.name!r}"

    def on_stop(self, name: str, stop: Callable[[], object]) -> None:
        """Run `stop` when the stack stops, before what was registered earlier."""
        self._cleanups.append((name, stop))

    def children(self) -> list[Child]:
        """The processes that must stay alive while the benchmark runs; subclasses add their daemons."""
        return [g.child for g in self.gateways.values()]

    def check_alive(self) -> None:
        """Raise (with their log tails) if a gateway or a daemon died (other than by the benchmark's hand)."""
        dead = [c for c in self.children() if not c.alive()]
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
