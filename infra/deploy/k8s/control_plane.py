"""The control plane: one Deployment per service, with its Service, autoscaler and disruption budget,
and the migration Job that a new version's pods wait for.

Order without Helm: the Job (`mac-provider migrate`, named after the image, so each
version gets its own) migrates with the owner role's URL; every pod first runs
`mac-provider migrate --check --wait` (an init container that changes nothing)
and starts only once the database has every migration its image ships. So one
`kubectl apply` of everything is safe: old pods keep serving until the Job is
done (migrations are additive, expand-then-contract), new ones start after it.
"""

from __future__ import annotations

import hashlib
import re

from infra.deploy.k8s.common import (
    APP_UID,
    DATABASE_CLIENT,
    GITHUB_CLIENT,
    METRICS,
    NATS_CLIENT,
    PUBLIC_HTTP,
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

PORT = 8080
# Secrets the operator makes (infra/deploy/secrets.example.yaml shows every key).
APP_SECRET = "mac-provider"
MIGRATE_SECRET = "mac-provider-migrate"
NATSAUTH_SECRET = "natsauth"
CONFIG = "mac-provider"
ACCOUNT = "mac-provider"
# The callout's logins in the NATS config (infra/deploy/k8s/nats.py) and the account it places clients in.
CALLOUT_USER = "natsauth"
SYSTEM_USER = "system"
APP_ACCOUNT = "APP"
# How long a new pod waits for the migration Job before its init container gives up (and is retried).
SCHEMA_WAIT_S = 600
_WAIVE = ("CKV_K8S_35", "CKV_K8S_15")


def _nats_url(values: Obj) -> str:
    # In the cluster the services connect without TLS (the server allows both, see nats.py);
    # NetworkPolicies keep the client port to our own pods and the public LoadBalancer.
    return f"nats://nats.{values['namespace']}.svc:4222"


def config_map(values: Obj) -> Obj:
    scheme = "https" if values["tlsSecret"] else "http"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(CONFIG, values["namespace"], "control-plane"),
        "data": {
            "NATS_URL": _nats_url(values),
            "MP_PUBLIC_URL": f"{scheme}://{values['host']}",
            "MP_TRUSTED_PROXY_HOPS": str(values["trustedProxyHops"]),
            "MP_MIGRATE_ON_START": "off",
            "MP_SHUTDOWN_DELAY_S": str(values["shutdownDelayS"]),
            "MP_POOL_WARMUP_S": str(values["poolWarmupS"]),
            "MP_NATS_AUTH_USER": CALLOUT_USER,
            "MP_NATS_SYS_USER": SYSTEM_USER,
            "MP_NATS_ACCOUNT": APP_ACCOUNT,
            # The usage-event stream on 3 of the NATS nodes (a majority survives losing one).
            "MP_USAGE_STREAM_REPLICAS": str(min(3, values["nats"]["replicas"])),
        },
    }


def service_account(values: Obj) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(ACCOUNT, values["namespace"], "control-plane"),
        # No service of ours talks to the Kubernetes API.
        "automountServiceAccountToken": False,
    }


def version_of(image: str) -> str:
    """A name-safe version of the image for the Job's name: its tag and the start of its digest."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[1] if ":" in last else ""
    parts = [re.sub(r"[^a-z0-9]+", "-", tag.lower()).strip("-")[:30], digest.removeprefix("sha256:")[:8]]
    return "-".join(p for p in parts if p) or hashlib.sha256(image.encode()).hexdigest()[:12]


def _env_from(name: str) -> list[Obj]:
    sources: list[Obj] = [{"configMapRef": {"name": CONFIG}}, {"secretRef": {"name": APP_SECRET}}]
    if name == "natsauth":
        sources.append({"secretRef": {"name": NATSAUTH_SECRET}})
    return sources


def _schema_wait(values: Obj) -> Obj:
    return {
        "name": "wait-for-schema",
        "image": values["image"],
        "imagePullPolicy": "IfNotPresent",
        "args": ["migrate", "--check", "--wait", str(SCHEMA_WAIT_S)],
        "env": [secret_env("DATABASE_URL", APP_SECRET, "DATABASE_URL")],
        "resources": resources(["50m", "500m"], ["128Mi", "256Mi"]),
        "securityContext": container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }


def _pod_labels(name: str, spec: Obj) -> dict[str, str]:
    extra = {NATS_CLIENT: "true", DATABASE_CLIENT: "true", METRICS: "true"}
    if spec["paths"]:
        extra[PUBLIC_HTTP] = "true"
    if name == "auth":
        extra[GITHUB_CLIENT] = "true"  # the OAuth code exchange and the user lookup
    return labels(name, **extra)


def deployment(values: Obj, name: str, spec: Obj) -> Obj:
    grace = int(spec["grace_s"])
    container = {
        "name": name,
        "image": values["image"],
        "imagePullPolicy": "IfNotPresent",
        "args": ["serve", "--service", name],
        "envFrom": _env_from(name),
        "env": [
            {"name": "MP_SHUTDOWN_GRACE_S", "value": str(grace)},
            # Unique per replica: its reply subjects and reservations are its own.
            {"name": "MP_GATEWAY_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        # Until the app has started (database, NATS, migrations checked): then liveness takes over.
        "startupProbe": http_probe("/healthz/live", "http", period=2, failures=30),
        # Only a stuck event loop is worth a restart; a lost database or NATS is readiness' business.
        "livenessProbe": http_probe("/healthz/live", "http", period=10, failures=3),
        # Not stopping, NATS connected, Postgres answering, and (gateway, status) a warm pool view.
        "readinessProbe": http_probe("/healthz/ready", "http", period=5, failures=2, timeout=3),
        "resources": resources(spec["cpu"], spec["memory"]),
        "securityContext": container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name, values["namespace"], name, waive=_WAIVE),
        "spec": {
            "replicas": spec["replicas"],
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector(name)},
            # A new pod must be ready before an old one goes: capacity never drops during a rollout.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": _pod_labels(name, spec),
                    # For Prometheus' Kubernetes discovery (the README's scrape job keeps the pods that say so).
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": ACCOUNT,
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security(APP_UID),
                    # The drain delay, the grace for running requests, then a margin for the cut and exit.
                    "terminationGracePeriodSeconds": int(values["shutdownDelayS"]) + grace + 15,
                    "initContainers": [_schema_wait(values)],
                    "containers": [container],
                    # MP_HOME and Python's temporary files; the root filesystem is read-only.
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": selector(name)},
                        }
                    ],
                },
            },
        },
    }


def service(values: Obj, name: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, values["namespace"], name),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(name),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def autoscaler(values: Obj, name: str, spec: Obj) -> Obj:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(name, values["namespace"], name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": spec["replicas"],
            "maxReplicas": spec["maxReplicas"],
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": spec["cpuTarget"]},
                    },
                }
            ],
            # Scaling in drains streams (up to the grace): do it slowly, scale out at once.
            "behavior": {
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                }
            },
        },
    }


def disruption_budget(values: Obj, name: str) -> Obj:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(name, values["namespace"], name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name)}},
    }


def migration_job(values: Obj) -> Obj:
    name = f"migrate-{version_of(values['image'])}"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(name, values["namespace"], "migrate", waive=_WAIVE),
        "spec": {
            "backoffLimit": 3,
            "activeDeadlineSeconds": 900,
            "ttlSecondsAfterFinished": 7 * 86400,
            "template": {
                "metadata": {"labels": labels("migrate", **{DATABASE_CLIENT: "true"})},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": ACCOUNT,
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security(APP_UID),
                    "containers": [
                        {
                            "name": "migrate",
                            "image": values["image"],
                            "imagePullPolicy": "IfNotPresent",
                            "args": ["migrate"],
                            # The schema owner's URL: the only place that may change the schema.
                            "env": [secret_env("DATABASE_URL", MIGRATE_SECRET, "DATABASE_URL")],
                            "resources": resources(["100m", "1"], ["128Mi", "256Mi"]),
                            "securityContext": container_security(),
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}],
                },
            },
        },
    }


def objects(values: Obj) -> list[Obj]:
    out = [config_map(values), service_account(values), migration_job(values)]
    for name, spec in values["services"].items():
        out.append(deployment(values, name, spec))
        if spec["paths"]:
            out.append(service(values, name))
        out.append(autoscaler(values, name, spec))
        out.append(disruption_budget(values, name))
    return out
