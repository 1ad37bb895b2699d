"""Who may talk to whom: the namespace, the public Ingress, and NetworkPolicies (deny unless allowed).

- Buyers and browsers reach the HTTP services only through the ingress controller (whose
  Ingress routes no path to /metrics or the probes).
- Prometheus, in `monitoringNamespace`, reaches every control-plane pod's port, for /metrics.
- Providers reach NATS' client port (TLS) through its LoadBalancer; nothing else of ours is public.
- Only NATS pods reach each other's route port; only our pods reach NATS and the database.
- Only `auth` goes out to the internet (GitHub's OAuth endpoints, HTTPS).
Probes come from the kubelet on the node, which NetworkPolicies always let through.
"""

from __future__ import annotations

from infra.deploy.k8s.common import (
    DATABASE_CLIENT,
    GITHUB_CLIENT,
    METRICS,
    NATS_CLIENT,
    PUBLIC_HTTP,
    Obj,
    metadata,
    selector,
)
from infra.deploy.k8s.control_plane import PORT
from infra.deploy.k8s.nats import CLIENT_PORT, NAME, ROUTE_PORT

# Address ranges "the internet" excludes for the one pod that may go there.
PRIVATE = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"]


def namespace(values: Obj) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": values["namespace"],
            # Pod Security Admission: the strictest profile, which every pod here meets.
            "labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
        },
    }


def _policy(
    values: Obj, name: str, pods: Obj, *, ingress: list[Obj] | None = None, egress: list[Obj] | None = None
) -> Obj:
    spec: Obj = {"podSelector": pods, "policyTypes": []}
    if ingress is not None:
        spec["policyTypes"].append("Ingress")
        spec["ingress"] = ingress
    if egress is not None:
        spec["policyTypes"].append("Egress")
        spec["egress"] = egress
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(name, values["namespace"], "network"),
        "spec": spec,
    }


def _tcp(port: int | str) -> list[Obj]:
    return [{"protocol": "TCP", "port": port}]


def policies(values: Obj) -> list[Obj]:
    nats_pods = {"podSelector": {"matchLabels": selector(NAME)}}
    everyone: Obj = {"matchLabels": {}}
    public_nats = [{"ipBlock": {"cidr": "0.0.0.0/0"}}] if values["nats"]["public"] else []
    scrapers = values["monitoringNamespace"]
    metrics = (
        [
            _policy(
                values,
                "metrics",
                {"matchLabels": {METRICS: "true"}},
                ingress=[
                    {
                        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": scrapers}}}],
                        "ports": _tcp(PORT),
                    }
                ],
            )
        ]
        if scrapers
        else []
    )
    return [
        *metrics,
        _policy(values, "default-deny", everyone, ingress=[], egress=[]),
        _policy(
            values,
            "dns",
            everyone,
            egress=[
                {
                    "to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                }
            ],
        ),
        _policy(
            values,
            "public-http",
            {"matchLabels": {PUBLIC_HTTP: "true"}},
            ingress=[
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": values["ingressNamespace"]}
                            }
                        }
                    ],
                    "ports": _tcp(PORT),
                }
            ],
        ),
        _policy(
            values,
            "nats-clients",
            {"matchLabels": {NATS_CLIENT: "true"}},
            egress=[{"to": [nats_pods], "ports": _tcp(CLIENT_PORT)}],
        ),
        _policy(
            values,
            "database-clients",
            {"matchLabels": {DATABASE_CLIENT: "true"}},
            egress=[
                {"to": [{"ipBlock": {"cidr": values["database"]["cidr"]}}], "ports": _tcp(values["database"]["port"])}
            ],
        ),
        _policy(
            values,
            "github",
            {"matchLabels": {GITHUB_CLIENT: "true"}},
            egress=[{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": PRIVATE}}], "ports": _tcp(443)}],
        ),
        _policy(
            values,
            "nats",
            {"matchLabels": selector(NAME)},
            ingress=[
                {
                    "from": [{"podSelector": {"matchLabels": {NATS_CLIENT: "true"}}}, *public_nats],
                    "ports": _tcp(CLIENT_PORT),
                },
                {"from": [nats_pods], "ports": _tcp(ROUTE_PORT)},
            ],
            egress=[{"to": [nats_pods], "ports": _tcp(ROUTE_PORT)}],
        ),
    ]


def ingress(values: Obj) -> Obj:
    paths = [
        {
            "path": path,
            # "/" is the landing page alone: as a Prefix it would send every unrouted path (/metrics) there.
            "pathType": "Exact" if path == "/" else "Prefix",
            "backend": {"service": {"name": name, "port": {"name": "http"}}},
        }
        for name, spec in values["services"].items()
        for path in spec["paths"]
    ]
    spec: Obj = {
        "ingressClassName": values["ingressClass"],
        "rules": [{"host": values["host"], "http": {"paths": paths}}],
    }
    if values["tlsSecret"]:
        spec["tls"] = [{"hosts": [values["host"]], "secretName": values["tlsSecret"]}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            **metadata("mac-provider", values["namespace"], "ingress"),
            # Streams must not be buffered or cut by the proxy (ingress-nginx; other controllers ignore these).
            "annotations": {
                "nginx.ingress.kubernetes.io/proxy-buffering": "off",
                "nginx.ingress.kubernetes.io/proxy-read-timeout": "900",
                "nginx.ingress.kubernetes.io/proxy-send-timeout": "900",
                "nginx.ingress.kubernetes.io/proxy-body-size": "8m",
            },
        },
        "spec": spec,
    }


def objects(values: Obj) -> list[Obj]:
    return [namespace(values), *policies(values), ingress(values)]
