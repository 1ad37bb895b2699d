"""A real pool for the failover and routing modes: the servers (stack.py) and several provider daemons
serving the SAME model id with the tiny real mlx-lm model (tests/support/tiny_model.py).

Daemons can be killed, stopped (SIGSTOP) and restarted under the same provider id;
`stop()` continues any stopped daemon before stopping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from infra.components import Child, DaemonChild, start_daemon
from tests.bench.progress import say
from tests.bench.stack import Gateway, GatewaySpec, Stack
from tests.support.tiny_model import write_tiny_model

MODEL_ID = "tiny-llama-bench"
# The weights the failover tests use: random but never EOS, so every request runs to max_tokens.
MODEL_SEED = 3
MODEL_CONTEXT = 1 << 16


@dataclass(frozen=True, slots=True)
class DaemonSpec:
    provider_id: str
    env: Mapping[str, str] = field(default_factory=dict)


class PoolStack(Stack):
    """nats-server, PostgreSQL, the given control planes, and one tiny-model daemon per DaemonSpec."""

    def __init__(self, home: Path, *, gateways: Sequence[GatewaySpec], daemons: Sequence[DaemonSpec]) -> None:
        super().__init__(home, gateways)
        if not daemons or len({d.provider_id for d in daemons}) != len(daemons):
            raise ValueError("at least one daemon, each with its own provider id")
        self.daemon_specs = {d.provider_id: d for d in daemons}
        self.daemons: dict[str, DaemonChild] = {}
        self.model_path = home / "models" / MODEL_ID

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}", "content-type": "application/json"}

    def start(self) -> None:
        write_tiny_model(self.model_path, seed=MODEL_SEED, context_length=MODEL_CONTEXT)
        super().start()

    def start_daemons(self) -> None:
        # One cleanup for all daemons: whichever process is current for each id when we stop.
        self.on_stop("daemons", self._stop_daemons)
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
            nats=self.nats_url,
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
        """Requests the daemon runs or queues now."""
        return int((await _admin_status(client, daemon))["requests"]["in_flight"])

    async def served(self, client: httpx.AsyncClient, daemon: DaemonChild) -> int:
        """Requests the daemon took from the pool since it started."""
        return int((await _admin_status(client, daemon))["pool"]["served"])

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

    def children(self) -> list[Child]:
        return [*super().children(), *self.daemons.values()]

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


async def _admin_status(client: httpx.AsyncClient, daemon: DaemonChild) -> dict[str, Any]:
    r = await client.get(f"{daemon.admin_url}/admin/status", headers=daemon.admin_headers(), timeout=5)
    r.raise_for_status()
    return r.json()
