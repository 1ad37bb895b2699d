"""A 3-node NATS cluster: StatefulSet with routes between its pods, JetStream storage, and the auth callout.

Authorization is the auth callout (services/natsauth/, the `natsauth` Deployment),
as in the local stack (infra/nats_auth.py): accounts AUTH (the callout's own
login), APP (where the callout places the control plane and each provider, with
their subjects) and SYS (the system account, whose login lets the callout close
a banned provider's connections). Every other login is a callout request.

Secrets reach the config as environment variables (nats-server expands `$NAME`):
the route password and the two logins' passwords; each route URL is composed by
Kubernetes from the password (`$(ROUTE_PASSWORD)`), since the server does not
expand variables inside a string. Routes use their own password, and only NATS
pods may reach the route port (network.py).

Providers are Macs on the internet: the client port is published by a
LoadBalancer Service and speaks TLS (`nats-tls`); pods in the cluster connect to
the `nats` Service without TLS (`allow_non_tls`), kept to our own pods by the
NetworkPolicies. Daemons must use a `tls://` NATS_URL.
"""

from __future__ import annotations

import json

from infra.deploy.k8s.common import (
    NATS_UID,
    Obj,
    container_security,
    http_probe,
    labels,
    metadata,
    pod_security,
    resources,
    secret_env,
    selector,
)
from infra.deploy.k8s.control_plane import APP_ACCOUNT, CALLOUT_USER, NATSAUTH_SECRET, SYSTEM_USER

NAME = "nats"
HEADLESS = "nats-cluster"
ROUTES_SECRET = "nats-routes"
CLIENT_PORT, ROUTE_PORT, MONITOR_PORT = 4222, 6222, 8222
_WAIVE = ("CKV_K8S_35", "CKV_K8S_15")


def _q(value: str) -> str:
    # JSON strings are valid NATS config strings.
    return json.dumps(value)


def _route_env(values: Obj) -> list[Obj]:
    ns, n = values["namespace"], values["nats"]["replicas"]
    return [
        {
            "name": f"ROUTE_{i}",
            "value": f"nats-route://route:$(ROUTE_PASSWORD)@{NAME}-{i}.{HEADLESS}.{ns}.svc:{ROUTE_PORT}",
        }
        for i in range(n)
    ]


def config(values: Obj) -> str:
    nats = values["nats"]
    if not nats["calloutIssuer"]:
        raise ValueError("values.nats.calloutIssuer is required: the public key of MP_NATS_ISSUER_SEED")
    routes = ", ".join(f"$ROUTE_{i}" for i in range(nats["replicas"]))
    lines = [
        "# Rendered by infra/deploy (python -m infra.deploy render); $NAMES come from the pod's environment.",
        "server_name: $POD_NAME",
        f"listen: 0.0.0.0:{CLIENT_PORT}",
        f"http: 0.0.0.0:{MONITOR_PORT}",
        "pid_file: /var/run/nats/nats.pid",
        # Requests carry whole chat prompts (as infra/nats.py).
        "max_payload: 8MB",
        # On SIGTERM (or preStop's lame-duck signal) clients move to the other nodes over this long.
        "lame_duck_duration: 30s",
        "lame_duck_grace_period: 10s",
    ]
    if nats["tls"]:
        lines += [
            "tls {",
            '  cert_file: "/etc/nats-tls/tls.crt"',
            '  key_file: "/etc/nats-tls/tls.key"',
            "  timeout: 2",
            "}",
            # Pods in the cluster connect in plain text (NetworkPolicy keeps the port to them); providers use TLS.
            "allow_non_tls: true",
        ]
    lines += [
        "jetstream {",
        '  store_dir: "/data/jetstream"',
        "  max_memory_store: 256MB",
        f"  max_file_store: {_store_limit(nats['storage'])}",
        "}",
        "cluster {",
        '  name: "mac-provider"',
        f"  listen: 0.0.0.0:{ROUTE_PORT}",
        "  authorization { user: route, password: $ROUTE_PASSWORD, timeout: 2 }",
        f"  routes: [{routes}]",
        # Pod addresses mean nothing to providers outside: never gossip them to clients.
        "  no_advertise: true",
        "}",
        "accounts {",
        f"  AUTH {{ users: [{{user: {_q(CALLOUT_USER)}, password: $NATSAUTH_PASSWORD}}] }}",
        # JetStream (the usage-event stream) in the application account only (as server_config.py).
        f"  {APP_ACCOUNT} {{ jetstream: enabled }}",
        f"  SYS {{ users: [{{user: {_q(SYSTEM_USER)}, password: $SYSTEM_PASSWORD}}] }}",
        "}",
        "system_account: SYS",
        "authorization {",
        "  timeout: 2",
        "  auth_callout {",
        f"    issuer: {_q(nats['calloutIssuer'])}",
        *([f"    xkey: {_q(nats['calloutXkey'])}"] if nats["calloutXkey"] else []),
        "    account: AUTH",
        f"    auth_users: [{_q(CALLOUT_USER)}, {_q(SYSTEM_USER)}]",
        "  }",
        "}",
        "",
    ]
    return "\n".join(lines)


def _store_limit(storage: str) -> str:
    """90% of the volume for JetStream files, in the server's units."""
    units = {"Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, size in units.items():
        if storage.endswith(suffix):
            mb = int(float(storage.removesuffix(suffix)) * size * 0.9) >> 20
            return f"{mb}MB"
    raise ValueError(f"values.nats.storage must be in Mi, Gi or Ti, got {storage!r}")


def config_map(values: Obj) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata("nats-config", values["namespace"], NAME),
        "data": {"nats.conf": config(values)},
    }


def services(values: Obj) -> list[Obj]:
    ns = values["namespace"]
    ports = [
        {"name": "client", "port": CLIENT_PORT, "targetPort": "client", "protocol": "TCP"},
        {"name": "route", "port": ROUTE_PORT, "targetPort": "route", "protocol": "TCP"},
        {"name": "monitor", "port": MONITOR_PORT, "targetPort": "monitor", "protocol": "TCP"},
    ]
    out = [
        # Stable names for the routes (nats-0.nats-cluster...), before the pods are ready.
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(HEADLESS, ns, NAME),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": selector(NAME),
                "ports": ports,
            },
        },
        # The control plane's way in.
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(NAME, ns, NAME),
            "spec": {"type": "ClusterIP", "selector": selector(NAME), "ports": ports[:1]},
        },
    ]
    if values["nats"]["public"]:
        # The providers' way in: TLS on the client port, nothing else.
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": metadata("nats-public", ns, NAME),
                "spec": {
                    "type": "LoadBalancer",
                    "externalTrafficPolicy": "Local",
                    "selector": selector(NAME),
                    "ports": ports[:1],
                },
            }
        )
    return out


def stateful_set(values: Obj) -> Obj:
    nats = values["nats"]
    mounts = [
        {"name": "config", "mountPath": "/etc/nats", "readOnly": True},
        {"name": "data", "mountPath": "/data"},
        {"name": "run", "mountPath": "/var/run/nats"},
    ]
    volumes: list[Obj] = [
        {"name": "config", "configMap": {"name": "nats-config"}},
        {"name": "run", "emptyDir": {"sizeLimit": "1Mi"}},
    ]
    if nats["tls"]:
        mounts.append({"name": "tls", "mountPath": "/etc/nats-tls", "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": nats["tlsSecret"]}})
    container = {
        "name": "nats",
        "image": values["natsImage"],
        "imagePullPolicy": "IfNotPresent",
        "command": ["nats-server", "--config", "/etc/nats/nats.conf"],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            # As many Ps as the container's CPU limit, not the node's cores (a Go before 1.25 reads the
            # node's): more Ps than cores only adds thread hand-offs (infra/nats.py `server_env`).
            {"name": "GOMAXPROCS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}},
            secret_env("ROUTE_PASSWORD", ROUTES_SECRET, "ROUTE_PASSWORD"),
            *_route_env(values),
            # The same passwords the natsauth service logs in with.
            secret_env("NATSAUTH_PASSWORD", NATSAUTH_SECRET, "MP_NATS_AUTH_PASSWORD"),
            secret_env("SYSTEM_PASSWORD", NATSAUTH_SECRET, "MP_NATS_SYS_PASSWORD"),
        ],
        "ports": [
            {"name": "client", "containerPort": CLIENT_PORT, "protocol": "TCP"},
            {"name": "route", "containerPort": ROUTE_PORT, "protocol": "TCP"},
            {"name": "monitor", "containerPort": MONITOR_PORT, "protocol": "TCP"},
        ],
        # NATS' own health endpoint: with JetStream, healthy once it has caught up with the cluster.
        "startupProbe": http_probe("/healthz?js-enabled-only=true", "monitor", period=5, failures=60),
        "livenessProbe": http_probe("/healthz?js-enabled-only=true", "monitor", period=10, failures=3, timeout=5),
        "readinessProbe": http_probe("/healthz?js-server-only=true", "monitor", period=5, failures=2),
        # Lame duck first: clients reconnect to the other nodes before this one stops.
        "lifecycle": {"preStop": {"exec": {"command": ["nats-server", "--signal", "ldm=/var/run/nats/nats.pid"]}}},
        "resources": resources(["250m", "2"], ["512Mi", "1Gi"]),
        "securityContext": container_security(),
        "volumeMounts": mounts,
    }
    claim: Obj = {
        "metadata": {"name": "data", "labels": labels(NAME)},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": nats["storage"]}}},
    }
    if nats["storageClass"]:
        claim["spec"]["storageClassName"] = nats["storageClass"]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(NAME, values["namespace"], NAME, waive=_WAIVE),
        "spec": {
            "serviceName": HEADLESS,
            "replicas": nats["replicas"],
            # All nodes start together: each needs the others' routes to form the cluster.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(NAME)},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": labels(NAME)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security(NATS_UID),
                    # Lame duck (30 s) plus the grace period, then a margin.
                    "terminationGracePeriodSeconds": 60,
                    "containers": [container],
                    "volumes": volumes,
                    # One node per host: losing a host loses one node, and the other two keep quorum.
                    "affinity": {
                        "podAntiAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "topologyKey": "kubernetes.io/hostname",
                                    "labelSelector": {"matchLabels": selector(NAME)},
                                }
                            ]
                        }
                    },
                },
            },
            "volumeClaimTemplates": [claim],
        },
    }


def disruption_budget(values: Obj) -> Obj:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(NAME, values["namespace"], NAME),
        # JetStream needs a majority: never more than one node down on purpose.
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(NAME)}},
    }


def objects(values: Obj) -> list[Obj]:
    return [config_map(values), *services(values), stateful_set(values), disruption_budget(values)]
