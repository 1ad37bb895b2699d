"""The overhead and metering modes' stack: the servers (stack.py) and one daemon on the synthetic engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from infra.components import Child, start_daemon, wait_model
from tests.bench.progress import say
from tests.bench.stack import GatewaySpec, Stack

MODEL_ID = "synthetic"
PROVIDER_ID = "bench-synthetic"


class SyntheticStack(Stack):
    """nats-server, PostgreSQL, one or more control planes on them, and one synthetic daemon."""

    def __init__(
        self,
        home: Path,
        *,
        gateway_env: Mapping[str, str] | None = None,
        gateways: Sequence[GatewaySpec] | None = None,
    ) -> None:
        if gateways is None:
            gateways = [GatewaySpec("gateway", dict(gateway_env or {}))]
        elif gateway_env is not None:
            raise ValueError("pass either gateway_env (one gateway) or gateways")
        super().__init__(home, gateways)
        self.daemon: Child | None = None

    @property
    def base_url(self) -> str:
        """The first gateway's (the only one in the overhead mode)."""
        first = self.gateways.get(self.gateway_specs[0].name)
        return first.base_url if first else ""

    def gateway_label(self, spec: GatewaySpec) -> str:
        # A lone gateway needs no name.
        return "control plane" if len(self.gateway_specs) == 1 else super().gateway_label(spec)

    def start_daemons(self) -> None:
        self.daemon = start_daemon(
            self.home, nats=self.nats_url, provider_id=PROVIDER_ID, model_id=MODEL_ID, engine="synthetic"
        )
        self.on_stop(self.daemon.name, self.daemon.stop)
        for gateway in self.gateways.values():
            wait_model(gateway.base_url, MODEL_ID, timeout=60, daemon=self.daemon)
        say(f"daemon {PROVIDER_ID} serving {MODEL_ID!r} with MP_ENGINE=synthetic (log: {self.daemon.log_path})")

    def children(self) -> list[Child]:
        return [*super().children(), *([self.daemon] if self.daemon else [])]
