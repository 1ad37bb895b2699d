"""The session's stack as tests see it: the model, the provider and the processes `conftest.stack` starts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.components import Child, DaemonChild, start_gateway
from infra.nats_auth import SecuredNats
from infra.ports import free_port
from infra.postgres import PostgresServer

TINY_MODEL = "tiny-llama"
TINY_PROVIDER = "tiny-mac-1"
REPO = Path(__file__).resolve().parent.parent.parent


@dataclass
class Stack:
    home: Path
    base_url: str
    api_key: str
    nats: SecuredNats
    database_url: str
    gateway: Child
    daemon: DaemonChild
    model_path: Path
    postgres: PostgresServer

    @property
    def nats_url(self) -> str:
        """A URL for tests that talk to the bus themselves: they do it as the control plane."""
        return self.nats.gateway_url

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@contextlib.contextmanager
def replica_of(stack: Stack, name: str, env: dict[str, str] | None = None) -> Iterator[tuple[Child, str]]:
    """Another control plane on the stack's Postgres and NATS (as behind a load balancer): it and its base URL."""
    port = free_port()
    gateway = start_gateway(
        stack.home, port=port, nats=stack.nats, database_url=stack.database_url, name=name, env=env or {}
    )
    try:
        yield gateway, f"http://127.0.0.1:{port}"
    finally:
        gateway.stop()
