"""`just cluster` (`python3 -m infra.cluster`): the local cluster, until Ctrl-C.

State lives in $MP_HOME/cluster (default .mp/cluster): PostgreSQL's data, the NATS
secrets and every process's log (logs/). Ctrl-C or SIGTERM stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from infra.cluster.launch import SYNTHETIC, Cluster, ClusterConfig


def _say(message: str) -> None:
    print(f"[cluster] {message}", flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="just cluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=3, help="gateway replicas behind the balancer (default 3)")
    parser.add_argument("--daemons", type=int, default=3, help="provider daemons (default 3)")
    parser.add_argument("--nats-nodes", type=int, default=3, help="NATS cluster nodes (default 3)")
    parser.add_argument(
        "--model",
        default=SYNTHETIC,
        help="'synthetic' (the default: NOT a model, fixed text as fast as it can, for control-plane load), "
        "'smollm2' (SmolLM2-135M, prepared once as for `just up`) or an mlx-lm model folder",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("MP_PORT", "8080")), help="the balancer's port")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    home = Path(os.environ.get("MP_HOME", ".mp")).expanduser().resolve() / "cluster"
    model, model_id = args.model, SYNTHETIC
    if args.model == "smollm2":
        from daemon.models.smollm2 import MODEL_ID, ensure_smollm2

        _say("preparing SmolLM2-135M-Instruct (the first run converts the GGUF once)")
        model, model_id = str(ensure_smollm2(home.parent / "models")), MODEL_ID
    elif args.model != SYNTHETIC:
        model = str(Path(args.model).resolve())
        model_id = Path(model).name
    config = ClusterConfig(
        replicas=args.replicas,
        daemons=args.daemons,
        nats_nodes=args.nats_nodes,
        model=model,
        model_id=model_id,
        port=args.port,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = Cluster(home, config, say=_say)
    code = 0
    try:
        cluster.start()
        _print_summary(cluster)
        while not stop.wait(0.5):
            dead = [c for c in cluster.children() if not c.alive()]
            if dead:
                for child in dead:
                    _say(f"{child.name} exited unexpectedly; log tail:\n{child.log_tail()}")
                code = 1
                break
    except Exception as exc:
        _say(f"failed to start: {exc}")
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        _say("stopping")
        cluster.stop()
        _say("stopped")
    return code


def _print_summary(cluster: Cluster) -> None:
    cfg = cluster.config
    engine = (
        "SYNTHETIC engine (MP_ENGINE=synthetic): NOT a model, a fixed text as fast as it can"
        if cfg.synthetic
        else cfg.model_id
    )
    assert cluster.nats is not None
    payload = json.dumps({"model": cfg.model_id, "messages": [{"role": "user", "content": "Hello"}]})
    lines = [
        "",
        "The cluster is up.",
        f"  base URL   : {cluster.url}/v1   (Caddy, health-checking /healthz/ready on every replica)",
        f"  API key    : {cluster.api_key}",
        f"  model      : {cfg.model_id}  ({engine})",
        *(f"  {g.name:<10} : {g.url}  (nats-{g.node})" for g in cluster.gateways),
        *(f"  {s.name:<10} : {s.url}  (nats-{s.node})" for s in cluster.services.values()),
        *(f"  {n.name:<10} : {n.url}  monitoring {n.monitor_url}/varz" for n in cluster.nats.nodes),
        f"  postgres   : {cluster.database_url}",
        *(f"  {d.provider_id:<10} : its own API {d.child.api_url}/v1  (nats-{d.node})" for d in cluster.daemons),
        f"  logs       : {cluster.home / 'logs'}",
        "",
        f"  curl {cluster.url}/v1/chat/completions -H 'Authorization: Bearer {cluster.api_key}' \\",
        f"    -H 'Content-Type: application/json' -d '{payload}'",
        "",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
