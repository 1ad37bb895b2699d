"""Pieces every workload shares: labels, the restricted security context, probes, policy waivers."""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]

PART_OF = "mac-provider"
# The image's user (infra/deploy/Dockerfile); NATS runs as another unprivileged id.
APP_UID = 10001
NATS_UID = 10002

# Labels NetworkPolicies select on (infra/deploy/k8s/network.py): what a pod may talk to.
NATS_CLIENT = "mac-provider/nats-client"
DATABASE_CLIENT = "mac-provider/database-client"
PUBLIC_HTTP = "mac-provider/public-http"
GITHUB_CLIENT = "mac-provider/github-client"
# Serves /metrics to the cluster's Prometheus (with MP_METRICS_TOKEN; services/metrics/scrape.py).
METRICS = "mac-provider/metrics"

# checkov checks the base waives everywhere they apply, each with its reason.
WAIVERS: dict[str, str] = {
    "CKV_K8S_35": (
        "The services read configuration only from MP_* environment variables (services/settings.py); "
        "secrets come from Secrets by reference and Settings never prints them."
    ),
    "CKV_K8S_15": (
        "Images are pinned by digest, which cannot name other bytes: IfNotPresent is exact, and Always "
        "would only make every pod start depend on the registry."
    ),
}


def labels(component: str, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/part-of": PART_OF,
        **extra,
    }


def selector(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": component, "app.kubernetes.io/part-of": PART_OF}


def metadata(name: str, namespace: str, component: str, *, waive: tuple[str, ...] = (), **extra: str) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace, "labels": labels(component, **extra)}
    if waive:
        meta["annotations"] = waivers(waive)
    return meta


def waivers(checks: tuple[str, ...], reasons: dict[str, str] | None = None) -> dict[str, str]:
    """checkov's skip annotations: `checkov.io/skipN: CHECK=reason`."""
    reasons = {**WAIVERS, **(reasons or {})}
    return {f"checkov.io/skip{i}": f"{check}={reasons[check]}" for i, check in enumerate(checks, 1)}


def pod_security(uid: int) -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resources(cpu: list[str], memory: list[str]) -> Obj:
    return {
        "requests": {"cpu": cpu[0], "memory": memory[0]},
        "limits": {"cpu": cpu[1], "memory": memory[1]},
    }


def http_probe(path: str, port: int | str, *, period: int, failures: int, timeout: int = 2) -> Obj:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def secret_env(name: str, secret: str, key: str, *, optional: bool = False) -> Obj:
    ref: Obj = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}
