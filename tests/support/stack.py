"""The session's stack as tests see it: the model, the provider and the processes `conftest.stack` starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infra.components import Child, DaemonChild
from infra.nats_auth import SecuredNats
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
