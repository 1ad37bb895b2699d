"""A NATS cluster on loopback: nodes with full-mesh routes, one bus (shared secrets), monitoring on.

Every node is a SecuredNats (infra/nats_auth.py) with the auth callout on: the nodes share
one `credentials.json` (copied from the first), so the callout's keys and the control
plane's password are the same everywhere, and a client let in by any node is in the same
APP account. JetStream is clustered: a stream of 3 replicas survives a node. Clients learn
the other nodes from the INFO a node sends (`connect_urls`), so a client whose node dies
reconnects to another. Each node serves its monitoring endpoints (/varz: slow consumers,
connections; /jsz: JetStream) on `http_port`.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra import procs
from infra.nats import HOST, NatsServer
from infra.nats_auth import SecuredNats
from infra.ports import free_port

CLUSTER_NAME = "mp-local"
_CREDENTIALS = "credentials.json"


class NatsNode:
    """One node: its client, route and monitoring ports stay the same across restarts."""

    def __init__(self, index: int, state_dir: Path, route_port: int, monitor_port: int) -> None:
        self.index = index
        self.state_dir = state_dir
        self.route_port = route_port
        self.monitor_port = monitor_port
        self.secured: SecuredNats | None = None

    @property
    def name(self) -> str:
        return f"nats-{self.index}"

    @property
    def server(self) -> NatsServer:
        if self.secured is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.secured.server

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def monitor_url(self) -> str:
        return f"http://{HOST}:{self.monitor_port}"

    def alive(self) -> bool:
        return self.secured is not None and self.server.proc.poll() is None

    def varz(self, timeout: float = 2.0) -> dict[str, Any]:
        """The node's /varz (server-wide counters: connections, slow_consumers, mem, ...)."""
        return self._monitor("varz", timeout)

    def jsz(self, timeout: float = 2.0) -> dict[str, Any]:
        """The node's /jsz (JetStream: its store, and `meta_cluster` with the leader it follows)."""
        return self._monitor("jsz", timeout)

    def _monitor(self, endpoint: str, timeout: float) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.monitor_url}/{endpoint}", timeout=timeout) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body


class NatsCluster:
    def __init__(self, home: Path, nodes: list[NatsNode], database_url: str) -> None:
        self.home = home
        self.nodes = nodes
        self.database_url = database_url

    @classmethod
    def start(cls, home: Path, *, size: int = 3, database_url: str) -> NatsCluster:
        """Start `size` nodes under `home/nats-<i>` (the first makes the secrets, the others copy them)."""
        if size < 1:
            raise ValueError("a cluster has at least one node")
        nodes = [NatsNode(i, (home / f"nats-{i}").resolve(), free_port(), free_port()) for i in range(size)]
        cluster = cls(home, nodes, database_url)
        try:
            for node in nodes:
                if node.index > 0:
                    node.state_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copy(nodes[0].state_dir / _CREDENTIALS, node.state_dir / _CREDENTIALS)
                node.secured = SecuredNats.start(
                    node.state_dir, database_url=database_url, extra_config=cluster._config(node)
                )
            cluster.wait_routes()
            cluster.wait_jetstream()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _config(self, node: NatsNode) -> str:
        routes = ", ".join(f"nats-route://{HOST}:{n.route_port}" for n in self.nodes if n is not node)
        # JetStream (infra/nats.py turns it on) is clustered over the routes: each node needs a unique
        # server_name and the cluster a name, and the nodes elect a meta leader among themselves.
        return "\n".join(
            [
                # Monitoring (/varz, /connz, /routez) on loopback: what the benchmark reads slow consumers from.
                f"http: {HOST}:{node.monitor_port}",
                f"server_name: {node.name}",
                f"cluster {{ name: {CLUSTER_NAME}, listen: {HOST}:{node.route_port}, routes: [{routes}] }}",
            ]
        )

    @property
    def first(self) -> SecuredNats:
        """The node that mints provider tokens (they live in Postgres: any node's callout accepts them)."""
        secured = self.nodes[0].secured
        if secured is None:
            raise RuntimeError("the cluster is not started")
        return secured

    def node(self, i: int) -> SecuredNats:
        secured = self.nodes[i % len(self.nodes)].secured
        if secured is None:
            raise RuntimeError("the cluster is not started")
        return secured

    def wait_routes(self, timeout: float = 20.0) -> None:
        """Until every live node has a route to every other live node."""

        def formed() -> bool:
            live = [n for n in self.nodes if n.alive()]
            return all(n.varz().get("routes", 0) >= len(live) - 1 for n in live)

        _wait(formed, "the NATS cluster's routes did not form", timeout)

    def wait_jetstream(self, timeout: float = 20.0) -> None:
        """Until every live node follows one JetStream meta leader (the usage stream can be made then)."""

        def elected() -> bool:
            leaders = {n.jsz().get("meta_cluster", {}).get("leader") for n in self.nodes if n.alive()}
            return len(leaders) == 1 and all(leaders)

        _wait(elected, "the NATS cluster elected no JetStream meta leader", timeout)

    def kill(self, i: int) -> None:
        """SIGKILL node `i` (no goodbye to its clients or routes)."""
        procs.stop(self.nodes[i].server.proc, sig=signal.SIGKILL, timeout=5.0)

    def restart(self, i: int) -> None:
        """Start node `i` again on its ports and config (stopping it first if it still runs)."""
        node = self.nodes[i]
        assert node.secured is not None
        node.secured.restart()
        self.wait_routes()
        self.wait_jetstream()

    def slow_consumers(self) -> dict[str, int]:
        """Each live node's slow-consumer count since it started."""
        return {n.name: int(n.varz().get("slow_consumers", 0)) for n in self.nodes if n.alive()}

    def pids(self) -> dict[str, int]:
        return {n.name: n.server.proc.pid for n in self.nodes if n.alive()}

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.secured is not None:
                node.secured.stop()


def _wait(condition: Callable[[], bool], failure: str, timeout: float) -> None:
    """Poll the nodes' monitoring endpoints until `condition` holds (a node not answering yet counts as not)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{failure} within {timeout:.0f}s")
        time.sleep(0.1)
