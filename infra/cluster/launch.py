"""Starting (and breaking) the local cluster: every process of a cloud deployment, on loopback.

Layout (as infra/deploy lays out Kubernetes, in miniature):
- PostgreSQL, one server;
- a NATS cluster of `nats_nodes` with routes and the auth callout (nats.py), answered by
  `natsauth` processes on two different nodes (the deployment runs 2: with one, a client
  whose node died could not log in again anywhere until the callout's own connection is back);
- `replicas` gateway replicas (`serve --service gateway`), replica i on NATS node i: killing a
  node really cuts replicas off, and they reconnect to the others (learnt from the node's INFO);
- status, auth, keys, usage and providers once each (`serve --service <name>`), each a
  process as in the deployment, so a replica's cost is the gateway's alone;
- the balancer (balancer.py), routing each service's paths (infra/deploy's Ingress paths) to it;
- `daemons` provider daemons, daemon i on node i+1, pinned: the synthetic engine (NOT a model;
  control-plane load only) or a real mlx-lm model.

The helpers at the end are the faults the benchmark injects: each acts on the real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from infra import procs
from infra.cluster.balancer import HEALTH_INTERVAL_S, Balancer, Route
from infra.cluster.nats import NatsCluster
from infra.components import (
    Child,
    DaemonChild,
    get_json,
    start_daemon,
    start_gateway,
    start_natsauth,
    wait_http,
)
from infra.deploy.k8s.values import SERVICE_DEFAULTS
from infra.devkey import ensure_dev_key
from infra.ports import free_port
from infra.postgres import PostgresServer
from infra.stack import pin_provider, trust_own_daemon

SYNTHETIC = "synthetic"
# The services that run once each beside the gateway replicas (natsauth has no routes).
SINGLE_SERVICES = ("status", "auth", "keys", "usage", "providers")
# Every path nobody else claims (the landing page, /health) goes to status.
DEFAULT_SERVICE = "status"

# Control-plane settings of the cluster: the balancer's checks run every HEALTH_INTERVAL_S, so a
# draining replica keeps taking requests for a few intervals (it is out by then) before refusing.
CONTROL_PLANE_ENV = {
    "MP_SHUTDOWN_DELAY_S": f"{max(1.0, 4 * HEALTH_INTERVAL_S):g}",
    "MP_SHUTDOWN_GRACE_S": "20",
    # The balancer appends the buyer's address to X-Forwarded-For.
    "MP_TRUSTED_PROXY_HOPS": "1",
    # Each process keeps few connections: 9 processes share one PostgreSQL.
    "MP_DB_POOL_SIZE": "6",
    # A dead replica's reservations are settled by the others after this long (default 30 s).
    "MP_RESERVATION_STALE_S": "10",
}
SYNTHETIC_ENV = {
    # The synthetic engine is no model: there are no weights to list in the catalog.
    "MP_UNCATALOGUED_MODELS": "allow",
    # Its 256 slots are believed (the default cap is 64 per provider).
    "MP_PROVIDER_MAX_SLOTS": "256",
}


@dataclass(frozen=True)
class ClusterConfig:
    replicas: int = 3
    daemons: int = 3
    nats_nodes: int = 3
    # "synthetic", or the path of an mlx-lm model folder every daemon serves.
    model: str = SYNTHETIC
    model_id: str = SYNTHETIC
    # The balancer's port (None: a free one).
    port: int | None = None
    # PostgreSQL without fsync (benchmarks and tests only).
    fast_postgres: bool = False
    # A database elsewhere (a test's server): then no PostgreSQL is started (and none can be restarted).
    database_url: str | None = None
    gateway_env: Mapping[str, str] = field(default_factory=dict)
    daemon_env: Mapping[str, str] = field(default_factory=dict)
    # The services besides the gateway (False: the replicas alone, with natsauth and status).
    split_services: bool = True

    @property
    def synthetic(self) -> bool:
        return self.model == SYNTHETIC


@dataclass
class Replica:
    """A control-plane process: its service(s), port and NATS node survive restarts."""

    name: str
    services: tuple[str, ...]
    port: int
    node: int
    child: Child

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Daemon:
    provider_id: str
    node: int
    child: DaemonChild
    stopped: bool = False


Say = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


class Cluster:
    """Build with `Cluster(home, config)`, then `start()`; `stop()` ends every process (idempotent)."""

    def __init__(self, home: Path, config: ClusterConfig, *, say: Say = _quiet) -> None:
        self.home = home.resolve()
        self.config = config
        self.say = say
        self.postgres: PostgresServer | None = None
        self.nats: NatsCluster | None = None
        self.natsauth: list[Child] = []
        self.services: dict[str, Replica] = {}
        self.gateways: list[Replica] = []
        self.daemons: list[Daemon] = []
        self.balancer: Balancer | None = None
        self.api_key = ""
        self._tokens: dict[str, str] = {}
        # What the daemons are started with (restart_daemons changes it: the benchmark's phases).
        self.daemon_env: dict[str, str] = dict(config.daemon_env)
        # Chosen before anything starts: every service is told where buyers reach it (MP_PUBLIC_URL).
        self.port = config.port or free_port()

    # ---- start and stop --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Where buyers reach the cluster: the balancer."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        if self.config.database_url is not None:
            return self.config.database_url
        if self.postgres is None:
            raise RuntimeError("the cluster is not started")
        return self.postgres.url

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        cfg = self.config
        self.home.mkdir(parents=True, exist_ok=True)
        if cfg.database_url is None:
            self.postgres = PostgresServer.start(self.home / "postgres", fast=cfg.fast_postgres)
            self.say(f"postgres on {self.postgres.url}")
        # Migrates, and makes the dev account's key.
        self.api_key = asyncio.run(ensure_dev_key(self.database_url, self.home / "dev.env"))
        self.nats = NatsCluster.start(self.home, size=cfg.nats_nodes, database_url=self.database_url)
        for node in self.nats.nodes:
            self.say(f"{node.name} on {node.url} (routes :{node.route_port}, monitoring {node.monitor_url})")
        nats = self.nats
        with ThreadPoolExecutor(max_workers=2) as pool:
            self.natsauth = list(
                pool.map(
                    lambda i: start_natsauth(
                        self.home, nats=nats.node(i), database_url=self.database_url, name=f"natsauth-{i}"
                    ),
                    range(min(2, cfg.nats_nodes)),
                )
            )
        for i in range(len(self.natsauth)):
            self.say(f"natsauth-{i} (the auth callout) on nats-{i}")

        planned: list[tuple[str, tuple[str, ...], int]] = [
            (f"gateway-{i}", ("gateway",) if cfg.split_services else ("gateway", "status"), i)
            for i in range(cfg.replicas)
        ]
        if cfg.split_services:
            planned += [(name, (name,), k) for k, name in enumerate(SINGLE_SERVICES)]
        with ThreadPoolExecutor(max_workers=len(planned)) as pool:
            started = list(pool.map(lambda p: self._start_control_plane(p[0], p[1], free_port(), p[2]), planned))
        for replica in started:
            if replica.name.startswith("gateway-"):
                self.gateways.append(replica)
            else:
                self.services[replica.name] = replica
            self.say(f"{replica.name} ({', '.join(replica.services)}) on {replica.url}, nats-{replica.node}")

        for i in range(cfg.daemons):
            self._start_daemon(i)
        self._wait_pool()
        self.balancer = Balancer.start(
            self.home / "balancer", routes=self._routes(), default=self._default_route(), port=self.port
        )
        self.say(f"balancer (Caddy) on {self.balancer.url}")
        self.wait_served()

    def _gateway_env(self) -> dict[str, str]:
        # The usage-event stream kept on every node (at most 3: JetStream needs a majority of its copies).
        replicas = {"MP_USAGE_STREAM_REPLICAS": str(min(3, self.config.nats_nodes))}
        synthetic = SYNTHETIC_ENV if self.config.synthetic else {}
        return {**CONTROL_PLANE_ENV, **replicas, **synthetic, **self.config.gateway_env}

    def _start_control_plane(self, name: str, services: tuple[str, ...], port: int, node: int) -> Replica:
        assert self.nats is not None
        env = {"MP_PUBLIC_URL": self.url, **self._gateway_env()}
        child = start_gateway(
            self.home,
            port=port,
            nats=self.nats.node(node),
            database_url=self.database_url,
            name=name,
            env=env,
            services=services,
        )
        return Replica(name, services, port, node % self.config.nats_nodes, child)

    def _provider_id(self, i: int) -> str:
        return f"cluster-d{i}"

    def _start_daemon(self, i: int, *, admin_port: int | None = None, api_port: int | None = None) -> Daemon:
        assert self.nats is not None
        cfg = self.config
        pid = self._provider_id(i)
        node = (i + 1) % cfg.nats_nodes
        if pid not in self._tokens:
            asyncio.run(pin_provider(self.database_url, pid))
            self._tokens[pid] = self.nats.first.provider_token(pid)
        child = start_daemon(
            self.home,
            nats=self.nats.node(node).url,
            provider_id=pid,
            model_id=cfg.model_id,
            model_path=None if cfg.synthetic else Path(cfg.model),
            engine="synthetic" if cfg.synthetic else "mlx",
            admin_port=admin_port,
            api_port=api_port,
            env={"MP_PROVIDER_TOKEN": self._tokens[pid], **self.daemon_env},
        )
        daemon = Daemon(pid, node, child)
        if i < len(self.daemons):
            self.daemons[i] = daemon
        else:
            self.daemons.append(daemon)
        label = "the SYNTHETIC engine (not a model)" if cfg.synthetic else cfg.model_id
        self.say(f"daemon {pid} on nats-{node} serving {label} (its own API: {child.api_url})")
        if not cfg.synthetic:
            # Gateways refuse uncatalogued weights: vouch for what our own pinned daemons serve.
            node_url = self.nats.first.url
            trust_own_daemon(self.database_url, node_url, self.nats.first.gateway.env(), pid, child, timeout=300)
        return daemon

    def _routes(self) -> list[Route]:
        routes = [Route("gateway", SERVICE_DEFAULTS["gateway"]["paths"], [g.port for g in self.gateways])]
        for name, replica in self.services.items():
            routes.append(Route(name, SERVICE_DEFAULTS[name]["paths"], [replica.port]))
        return routes

    def _default_route(self) -> Route:
        target = self.services.get(DEFAULT_SERVICE)
        ports = [target.port] if target is not None else [g.port for g in self.gateways]
        return Route("default", [], ports)

    def _wait_pool(self, timeout: float = 120.0) -> None:
        """Until every routing process hears every running daemon's heartbeats."""
        want = sum(1 for d in self.daemons if not d.stopped and d.child.alive())
        for replica in [*self.gateways, *self.services.values()]:
            if "gateway" not in replica.services and "status" not in replica.services:
                continue
            deadline = time.monotonic() + timeout
            while True:
                for d in self.daemons:
                    if not d.child.alive() and not d.stopped:
                        raise procs.ProcessExitedError(f"{d.child.name} exited; log tail:\n{d.child.log_tail()}")
                try:
                    _status, body = get_json(f"{replica.url}/health", timeout=2.0)
                    if isinstance(body, dict) and int(body.get("providers", 0)) >= want:
                        break
                except (OSError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{replica.name} did not see {want} providers within {timeout:.0f}s")
                time.sleep(0.1)

    def wait_served(self, timeout: float = 60.0) -> None:
        """Until the balancer answers /v1/models with the model (every hop up: balancer, status, pool)."""
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.api_key}"}
        while True:
            try:
                status, body = get_json(f"{self.url}/v1/models", headers=headers, timeout=2.0)
                served = isinstance(body, dict) and any(
                    m.get("id") == self.config.model_id for m in body.get("data", [])
                )
                if status == 200 and served:
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the balancer did not serve {self.config.model_id} within {timeout:.0f}s")
            time.sleep(0.1)

    def children(self) -> list[Child]:
        """Every process started as a Child (control plane, callout, daemons)."""
        return [
            *self.natsauth,
            *(g.child for g in self.gateways),
            *(s.child for s in self.services.values()),
            *(d.child for d in self.daemons),
        ]

    def stop(self) -> None:
        """Stop everything: the balancer, then daemons and control planes together (each drains on its
        own), the callout, NATS, PostgreSQL last. Never raises; idempotent."""
        for d in self.daemons:
            if d.stopped:
                _signal_group(d.child, signal.SIGCONT)
        waves: list[list[Callable[[], object]]] = [
            [self.balancer.stop] if self.balancer is not None else [],
            [
                c.stop
                for c in [
                    *(d.child for d in self.daemons),
                    *(r.child for r in [*self.gateways, *self.services.values()]),
                ]
            ],
            [c.stop for c in self.natsauth],
            [self.nats.stop] if self.nats is not None else [],
            [self.postgres.stop] if self.postgres is not None else [],
        ]
        for wave in waves:
            if wave:
                with ThreadPoolExecutor(max_workers=len(wave)) as pool:
                    for future in [pool.submit(step) for step in wave]:
                        try:
                            future.result()
                        except Exception as exc:
                            self.say(f"stopping: {exc!r}")
        self.balancer = None
        self.daemons, self.gateways, self.services, self.natsauth = [], [], {}, []
        self.nats = self.postgres = None

    # ---- what a run observes ---------------------------------------------------------------

    def pids(self) -> dict[str, int]:
        """Every process by name (a server's own children, e.g. PostgreSQL's backends, are not listed)."""
        out: dict[str, int] = {}
        if self.postgres is not None:
            out["postgres"] = self.postgres.proc.pid
        if self.nats is not None:
            out.update(self.nats.pids())
        if self.balancer is not None:
            out["balancer"] = self.balancer.proc.pid
        for child in self.children():
            if child.alive():
                out[child.name] = child.proc.pid
        return out

    def rss_mb(self) -> dict[str, float]:
        """Memory (MB) of every process: its RSS; PostgreSQL's is the USS of all its processes (their
        shared buffers, counted once per process in RSS, would swamp any change)."""
        out: dict[str, float] = {}
        for name, pid in self.pids().items():
            try:
                proc = psutil.Process(pid)
                if name == "postgres":
                    members = [proc, *proc.children(recursive=True)]
                    out[name] = sum(p.memory_full_info().uss for p in members) / 1e6
                else:
                    out[name] = proc.memory_info().rss / 1e6
            except psutil.Error:
                continue
        return out

    # ---- faults ----------------------------------------------------------------------------

    def kill_gateway(self, i: int) -> None:
        """kill -9 replica i."""
        procs.stop(self.gateways[i].child.proc, sig=signal.SIGKILL, timeout=5.0)

    def start_gateway_again(self, i: int, *, timeout: float = 60.0) -> None:
        """Start replica i on its port again and wait until it is ready (so the balancer sends to it)."""
        old = self.gateways[i]
        self.gateways[i] = self._start_control_plane(old.name, old.services, old.port, old.node)
        wait_http(f"{old.url}/healthz/ready", timeout=timeout, child=self.gateways[i].child)

    def drain_gateway(self, i: int) -> int:
        """SIGTERM replica i and wait for its graceful exit; returns its exit status."""
        grace = float(self._gateway_env()["MP_SHUTDOWN_GRACE_S"]) + float(self._gateway_env()["MP_SHUTDOWN_DELAY_S"])
        return self.gateways[i].child.stop(timeout=grace + 15.0)

    def kill_daemon(self, i: int) -> None:
        procs.stop(self.daemons[i].child.proc, sig=signal.SIGKILL, timeout=5.0)

    def start_daemon_again(self, i: int) -> None:
        old = self.daemons[i].child
        self._start_daemon(i, admin_port=old.admin_port, api_port=old.api_port)
        self._wait_pool()

    def restart_daemons(self, env: Mapping[str, str]) -> None:
        """Stop every daemon and start it again (same ports) with `env` over the config's daemon_env."""
        self.daemon_env = {**self.config.daemon_env, **env}
        with ThreadPoolExecutor(max_workers=max(1, len(self.daemons))) as pool:
            list(pool.map(lambda d: d.child.stop(), self.daemons))
        for i, d in enumerate(list(self.daemons)):
            self._start_daemon(i, admin_port=d.child.admin_port, api_port=d.child.api_port)
        # The gateways first notice the old processes leave (their last heartbeats), then the new ones.
        time.sleep(2.0)
        self._wait_pool()

    def freeze_daemon(self, i: int) -> None:
        """SIGSTOP the daemon and its children: a Mac asleep (its connections stay open, silent)."""
        self.daemons[i].stopped = True
        _signal_group(self.daemons[i].child, signal.SIGSTOP)

    def thaw_daemon(self, i: int) -> None:
        _signal_group(self.daemons[i].child, signal.SIGCONT)
        self.daemons[i].stopped = False

    def kill_nats(self, i: int) -> None:
        assert self.nats is not None
        self.nats.kill(i)

    def start_nats_again(self, i: int) -> None:
        assert self.nats is not None
        self.nats.restart(i)

    def restart_postgres(self, *, down_s: float = 0.0) -> None:
        """A fast shutdown of PostgreSQL (every connection dropped), then the same server again."""
        if self.postgres is None:
            raise RuntimeError("this cluster runs on a database it did not start")
        port, data_dir = self.postgres.port, self.postgres.data_dir
        self.postgres.stop()
        time.sleep(down_s)
        self.postgres = PostgresServer.start(data_dir, port=port, fast=self.config.fast_postgres)

    def ready(self, replica: Replica) -> bool:
        try:
            status, _ = get_json(f"{replica.url}/healthz/ready", timeout=1.0)
        except (OSError, ValueError):
            return False
        return status == 200


def _signal_group(child: Child, sig: signal.Signals) -> None:
    # The daemon leads its own process group (procs.spawn): its workers get the signal too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.proc.pid, sig)
