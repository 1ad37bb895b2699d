"""A real pool for the failover and routing modes: nats-server, PostgreSQL, control plane(s), and several
provider daemons serving the SAME model id with the tiny real mlx-lm model (tests/support/tiny_model.py).

Daemons can be killed, stopped (SIGSTOP) and restarted under the same provider id.
Everything is torn down newest first by `stop()`, which ignores Ctrl-C/SIGTERM
while it runs, continues any stopped daemon first, and never raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from infra.components import Child, DaemonChild, start_daemon, start_gateway
from infra.devkey import ensure_dev_key
from infra.nats import NatsServer
from infra.ports import free_port
from infra.postgres import PostgresServer
from tests.bench.stack import Gateway, GatewaySpec, say
from tests.support.tiny_model import write_tiny_model

MODEL_ID = "tiny-llama-bench"
# The weights the failover tests use: random but never EOS, so every request runs to max_tokens.
MODEL_SEED = 3
MODEL_CONTEXT = 1 << 16


def cores() -> str:
    total = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        usable = total
    return f"{usable} CPU cores" + ("" if usable == total else f" usable (of {total})")


def load_average() -> float:
    """The machine's 1-minute load average: how much else (besides this benchmark) wants the cores."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


@dataclass(frozen=True, slots=True)
class DaemonSpec:
    provider_id: str
    env: Mapping[str, str] = field(default_factory=dict)


class PoolStack:
    """nats-server, PostgreSQL, the given control planes, and one tiny-model daemon per DaemonSpec."""

    def __init__(self, home: Path, *, gateways: Sequence[GatewaySpec], daemons: Sequence[DaemonSpec]) -> None:
        if not gateways or len({g.name for g in gateways}) != len(gateways):
            raise ValueError("at least one gateway, each with its own name")
        if not daemons or len({d.provider_id for d in daemons}) != len(daemons):
            raise ValueError("at least one daemon, each with its own provider id")
        self.home = home
        self.gateway_specs = list(gateways)
        self.daemon_specs = {d.provider_id: d for d in daemons}
        self.gateways: dict[str, Gateway] = {}
        self.daemons: dict[str, DaemonChild] = {}
        self.api_key = ""
        self.nats_url = ""
        self.model_path = home / "models" / MODEL_ID
        self._cleanups: list[tuple[str, Callable[[], object]]] = []

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}", "content-type": "application/json"}

    def start(self) -> None:
        write_tiny_model(self.model_path, seed=MODEL_SEED, context_length=MODEL_CONTEXT)
        nats = NatsServer.start(self.home / "nats")
        self._cleanups.append(("nats-server", nats.stop))
        self.nats_url = nats.url
        say(f"nats-server on {nats.url}")

        pg = PostgresServer.start(self.home / "postgres", fast=True)
        self._cleanups.append(("postgres", pg.stop))
        say(f"postgres on {pg.url}")
        self.api_key = asyncio.run(ensure_dev_key(pg.url, self.home / "dev.env"))

        for spec in self.gateway_specs:
            port = free_port()
            child = start_gateway(
                self.home, port=port, nats_url=nats.url, database_url=pg.url, name=spec.name, env=spec.env
            )
            self._cleanups.append((spec.name, child.stop))
            self.gateways[spec.name] = Gateway(spec.name, f"http://127.0.0.1:{port}", child)
            say(f"control plane {spec.name!r} on http://127.0.0.1:{port} (log: {child.log_path})")

        # One cleanup for all daemons: whichever process is current for each id when we stop.
        self._cleanups.append(("daemons", self._stop_daemons))
        # All start at once (their imports and model loads overlap); then wait for each in every gateway's pool.
        for provider_id in self.daemon_specs:
            self.spawn_daemon(provider_id)
        started = time.monotonic()
        asyncio.run(self.wait_pool(within_s=120))
        say(f"{len(self.daemons)} daemons serving {MODEL_ID!r} in the pool after {time.monotonic() - started:.1f}s")

    def spawn_daemon(self, provider_id: str) -> DaemonChild:
        """Start (or start again) the daemon with this provider id; returns at once (see `wait_pool`)."""
        spec = self.daemon_specs[provider_id]
        env = {"MP_IDLE_UNLOAD_S": "0", **spec.env}
        child = start_daemon(
            self.home,
            nats_url=self.nats_url,
            provider_id=provider_id,
            model_id=MODEL_ID,
            model_path=self.model_path,
            env=env,
        )
        self.daemons[provider_id] = child
        return child

    async def pool_size(self, client: httpx.AsyncClient, gateway: Gateway) -> int:
        """How many providers of MODEL_ID the gateway's pool holds now."""
        r = await client.get(f"{gateway.base_url}/v1/status", timeout=5)
        r.raise_for_status()
        return next((int(m["providers"]) for m in r.json()["models"] if m["id"] == MODEL_ID), 0)

    async def in_flight(self, client: httpx.AsyncClient, daemon: DaemonChild) -> int:
        """Requests the daemon runs or queues now (its /admin/status)."""
        r = await client.get(f"{daemon.admin_url}/admin/status", timeout=5)
        r.raise_for_status()
        return int(r.json()["requests"]["in_flight"])

    async def served(self, client: httpx.AsyncClient, daemon: DaemonChild) -> int:
        """Requests the daemon took from the pool since it started (its /admin/status)."""
        r = await client.get(f"{daemon.admin_url}/admin/status", timeout=5)
        r.raise_for_status()
        return int(r.json()["pool"]["served"])

    async def wait_pool(self, *, within_s: float) -> float:
        """Until every gateway's pool holds every daemon and no daemon runs anything; then one warm-up each.

        Returns the time.monotonic() at which every pool first held every daemon.
        The warm-up is one short request to each daemon's own local API (not via
        the pool), so that no measured request is a fresh worker's first.
        """
        deadline = time.monotonic() + within_s
        want = len(self.daemon_specs)
        full_at: float | None = None
        async with httpx.AsyncClient() as client:
            while True:
                self.check_alive()
                try:
                    sizes = [await self.pool_size(client, g) for g in self.gateways.values()]
                    if full_at is None and all(s == want for s in sizes):
                        full_at = time.monotonic()
                    busy = [await self.in_flight(client, d) for d in self.daemons.values()]
                    if full_at is not None and all(s == want for s in sizes) and not any(busy):
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the pool did not show {want} idle providers of {MODEL_ID} in {within_s:.0f}s")
                await asyncio.sleep(0.05)
            for daemon in self.daemons.values():
                r = await client.post(
                    f"{daemon.api_url}/v1/chat/completions",
                    json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                    timeout=60,
                )
                if r.status_code != 200:
                    raise RuntimeError(f"warm-up of {daemon.name} failed: {r.status_code} {r.text[:200]}")
        return full_at

    def dead_children(self) -> list[Child]:
        children: list[Child] = [g.child for g in self.gateways.values()]
        children.extend(self.daemons.values())
        return [c for c in children if not c.alive()]

    def check_alive(self) -> None:
        """Raise (with their log tails) if a gateway or a daemon died (other than by the benchmark's hand)."""
        dead = self.dead_children()
        if dead:
            tails = "\n".join(f"--- {child.name}:\n{child.log_tail()}" for child in dead)
            raise RuntimeError(f"{', '.join(c.name for c in dead)} died during the benchmark\n{tails}")

    @staticmethod
    def signal_group(daemon: DaemonChild, sig: signal.Signals) -> None:
        """`sig` to the daemon and its worker (its own process group: infra.procs.spawn starts a session)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.proc.pid, sig)

    def _stop_daemons(self) -> None:
        for daemon in self.daemons.values():
            # A stopped process would sit out SIGTERM until procs.stop's SIGKILL.
            self.signal_group(daemon, signal.SIGCONT)
        for daemon in self.daemons.values():
            try:
                daemon.stop()
            except Exception as exc:
                say(f"stopping {daemon.name} failed: {exc!r}")

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
