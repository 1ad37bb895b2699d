"""The Kubernetes manifests (infra/deploy): rendered for every overlay, valid against the API schemas
(kubernetes-validate), clean under the policy linter (checkov, one run for the whole session), and
saying what the code does: probes on routes that exist, Ingress paths that reach their service, secrets
only by reference, a migration each pod waits for, a NATS config that nats-server itself accepts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from litestar.handlers import HTTPRouteHandler

from infra.deploy.__main__ import main as render_main
from infra.deploy.__main__ import write_dir
from infra.deploy.k8s import render
from infra.deploy.k8s.values import OVERLAYS
from infra.nats import find_nats_server
from services.app import SERVICES, create_app
from services.settings import Settings
from services.usage import ledger
from tests.support import tools

REPO = Path(__file__).resolve().parent.parent
OVERLAY_NAMES = sorted(p.stem for p in OVERLAYS.glob("*.yaml"))
# The oldest Kubernetes the manifests promise to work on (autoscaling/v2, policy/v1, PSA labels).
KUBERNETES = "1.30.0"
# Env var names whose values are secret: they may only come from a Secret.
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|SEED|TOKEN|DATABASE_URL")

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: render(name) for name in OVERLAY_NAMES}


def _kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def _pod_specs(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield o, o["spec"]["template"]["spec"]


def test_overlays_exist_and_render_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert {"dev", "production"} <= set(OVERLAY_NAMES)
    assert render_main(["render", "dev", "-o", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("*.yaml"))
    assert files[0].name.startswith("00-namespace-")  # applied first with `kubectl apply -f DIR`
    assert render_main(["render", "production"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert len(docs) == len(render("production"))


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_object_is_valid_against_the_kubernetes_schemas(rendered: dict[str, list[Obj]], overlay: str) -> None:
    for obj in rendered[overlay]:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_the_schema_check_does_reject_a_wrong_object() -> None:
    bad = render("dev")[0] | {"spec": {"replicas": "three"}}  # a Namespace has no such field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


@pytest.fixture(scope="session")
def checkov_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Obj]:
    """One checkov run over every overlay and a deliberately careless canary (checkov is slow to start)."""
    root = tmp_path_factory.mktemp("checkov")
    for name in OVERLAY_NAMES:
        write_dir(render(name), root / name)
    canary = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "careless", "namespace": "x"},
        "spec": {"containers": [{"name": "c", "image": "nginx:latest"}]},
    }
    (root / "canary").mkdir()
    (root / "canary" / "pod.yaml").write_text(yaml.safe_dump(canary))
    exe = tools.checkov()
    started = time.monotonic()
    result = subprocess.run(
        [str(exe), "--directory", str(root), "--framework", "kubernetes", "--output", "json", "--quiet"],
        capture_output=True,
        text=True,
        env=tools.checkov_env(),
        timeout=300,
    )
    print(f"checkov took {time.monotonic() - started:.1f} s")
    assert result.returncode in (0, 1), result.stderr[-2000:]
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    by_folder: dict[str, Obj] = {name: {"failed": [], "skipped": []} for name in [*OVERLAY_NAMES, "canary"]}
    for kind in ("failed", "skipped"):
        for check in report["results"].get(f"{kind}_checks", []):
            folder = Path(check["file_abs_path"]).relative_to(root).parts[0]
            by_folder[folder][kind].append(check)
    return by_folder


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_checkov_finds_nothing_and_every_waiver_has_a_reason(checkov_results: dict[str, Obj], overlay: str) -> None:
    failed = checkov_results[overlay]["failed"]
    assert failed == [], [(f["check_id"], f["check_name"], f["resource"]) for f in failed]
    for skip in checkov_results[overlay]["skipped"]:
        assert len(skip["check_result"].get("suppress_comment", "")) > 40, skip["check_id"]


def test_checkov_does_fail_a_careless_pod(checkov_results: dict[str, Obj]) -> None:
    ids = {f["check_id"] for f in checkov_results["canary"]["failed"]}
    assert {"CKV_K8S_22", "CKV_K8S_28", "CKV_K8S_8", "CKV_K8S_14"} <= ids, ids  # read-only fs, caps, probes, :latest


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_one_deployment_per_service_with_probes_on_routes_that_exist(
    rendered: dict[str, list[Obj]], overlay: str, tmp_path: Path
) -> None:
    deployments = {d["metadata"]["name"]: d for d in _kind(rendered[overlay], "Deployment")}
    # Every service of the app, plus the NATS auth callout (its own branch adds it to SERVICES).
    assert set(SERVICES) <= set(deployments)
    assert set(deployments) - set(SERVICES) <= {"natsauth"}
    app = create_app(Settings.from_env({"MP_HOME": str(tmp_path), "MP_SECRET_KEY": "x" * 32}))
    paths = {route.path for route in app.routes}
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["args"] == ["serve", "--service", name]
        assert c["readinessProbe"]["httpGet"]["path"] == "/healthz/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz/live"
        assert {"/healthz/ready", "/healthz/live"} <= paths
        # Shutdown: the pod gets the drain delay and its grace, with room to cut and exit.
        env = {e["name"]: e.get("value") for e in c["env"]}
        grace = int(env["MP_SHUTDOWN_GRACE_S"])
        assert pod["terminationGracePeriodSeconds"] >= grace + 10
        # A new version waits for its migrations; nothing in it may change the schema.
        (init,) = pod["initContainers"]
        assert init["args"][:2] == ["migrate", "--check"]
        assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpas = {h["spec"]["scaleTargetRef"]["name"] for h in _kind(rendered[overlay], "HorizontalPodAutoscaler")}
    pdbs = {p["metadata"]["name"] for p in _kind(rendered[overlay], "PodDisruptionBudget")}
    assert set(deployments) <= hpas
    assert {*deployments, "nats"} <= pdbs
    (config,) = [c for c in _kind(rendered[overlay], "ConfigMap") if c["metadata"]["name"] == "mac-provider"]
    assert config["data"]["MP_MIGRATE_ON_START"] == "off"
    (job,) = _kind(rendered[overlay], "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_ingress_paths_reach_the_service_that_serves_them(rendered: dict[str, list[Obj]], overlay: str) -> None:
    (ingress,) = _kind(rendered[overlay], "Ingress")
    routed: dict[str, str] = {}
    exact: set[str] = set()  # Exact paths match themselves only, not what lies under them
    for rule in ingress["spec"]["rules"]:
        for p in rule["http"]["paths"]:
            routed[p["path"]] = p["backend"]["service"]["name"]
            if p["pathType"] == "Exact":
                exact.add(p["path"])
    services = {s["metadata"]["name"] for s in _kind(rendered[overlay], "Service")}
    assert set(routed.values()) <= services
    for name, handlers in SERVICES.items():
        for handler in handlers:
            if not isinstance(handler, HTTPRouteHandler):
                continue
            for path in handler.paths:
                if path == "/health":
                    continue  # for people and probes inside the cluster, not the internet
                owners = {
                    svc
                    for prefix, svc in routed.items()
                    if path == prefix or (prefix not in exact and path.startswith(prefix.rstrip("/") + "/"))
                }
                assert owners == {name}, (path, owners)
    assert not any(p.startswith("/healthz") for p in routed)
    # The scrape endpoint is for the cluster's Prometheus only (and wants MP_METRICS_TOKEN besides).
    assert not any(
        p == "/metrics" or (p not in exact and "/metrics".startswith(p.rstrip("/") + "/")) for p in routed
    ), routed


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_secrets_come_only_from_secrets_that_the_example_documents(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    assert not _kind(rendered[overlay], "Secret")
    example = {
        s["metadata"]["name"]: set(s["stringData"])
        for s in yaml.safe_load_all((REPO / "infra" / "deploy" / "secrets.example.yaml").read_text())
    }
    for obj, pod in _pod_specs(rendered[overlay]):
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            for e in c.get("env", []):
                if SECRET_NAMES.search(e["name"]):
                    assert "value" not in e, (obj["metadata"]["name"], e["name"])
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in example[ref["name"]], ref
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in example
        for v in pod.get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"].endswith("-tls")
    for config in _kind(rendered[overlay], "ConfigMap"):
        for key in config["data"]:
            assert not SECRET_NAMES.search(key), key
    assert all(
        all(v == "REPLACE_ME" or "REPLACE_ME" in v or not SECRET_NAMES.search(k) for k, v in s["stringData"].items())
        for s in yaml.safe_load_all((REPO / "infra" / "deploy" / "secrets.example.yaml").read_text())
    )


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_pod_is_locked_down(rendered: dict[str, list[Obj]], overlay: str) -> None:
    for obj, pod in _pod_specs(rendered[overlay]):
        name = obj["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(c["resources"]["limits"]), name


def _nats_env(tmp_path: Path, objects: list[Obj]) -> tuple[Path, dict[str, str]]:
    """The rendered nats.conf, as a pod would see it (TLS files made here), and the pod's environment."""
    (config,) = [c for c in _kind(objects, "ConfigMap") if c["metadata"]["name"] == "nats-config"]
    text = config["data"]["nats.conf"]
    if "/etc/nats-tls/" in text:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(tmp_path / "tls.key"), "-out", str(tmp_path / "tls.crt"), "-days", "1",
             "-subj", "/CN=nats"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        text = text.replace("/etc/nats-tls/", f"{tmp_path}/")
    path = tmp_path / "nats.conf"
    path.write_text(text)
    (sts,) = _kind(objects, "StatefulSet")
    env = {"POD_NAME": "nats-0", "ROUTE_PASSWORD": "0123abcd", "NATSAUTH_PASSWORD": "a", "SYSTEM_PASSWORD": "b"}
    for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in e:  # Kubernetes expands $(NAME) from the variables before it
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])
    return path, env


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_nats_server_accepts_the_cluster_config(rendered: dict[str, list[Obj]], overlay: str, tmp_path: Path) -> None:
    path, env = _nats_env(tmp_path, rendered[overlay])
    result = subprocess.run(
        [find_nats_server(), "-t", "-c", str(path)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = path.read_text()
    assert "auth_callout" in text
    assert len(re.findall(r"\$ROUTE_\d", text)) == 3
    (sts,) = _kind(rendered[overlay], "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]


def test_a_wrong_callout_key_is_refused_by_nats_server(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    path, env = _nats_env(tmp_path, rendered["dev"])
    path.write_text(re.sub(r'issuer: "A', 'issuer: "X', path.read_text()))
    result = subprocess.run(
        [find_nats_server(), "-t", "-c", str(path)], env={**os.environ, **env}, capture_output=True, text=True
    )
    assert result.returncode != 0


def test_nats_config_matches_the_local_callout_setup(rendered: dict[str, list[Obj]]) -> None:
    """The cluster's accounts and logins are the ones the local stack's callout config uses (infra/nats_auth.py)."""
    from infra import nats_auth as local
    from infra.deploy.k8s import control_plane
    from services.natsauth import server_config as accounts

    config = next(c for c in _kind(rendered["production"], "ConfigMap") if c["metadata"]["name"] == "nats-config")
    conf = config["data"]["nats.conf"]
    assert control_plane.CALLOUT_USER == local.CALLOUT_USER
    assert control_plane.SYSTEM_USER == local.SYSTEM_USER
    assert control_plane.APP_ACCOUNT == local.APP_ACCOUNT
    for account in (accounts.AUTH_ACCOUNT, accounts.APP_ACCOUNT, accounts.SYS_ACCOUNT):
        assert re.search(rf"^\s+{account} \{{", conf, re.M), account
    assert f"account: {accounts.AUTH_ACCOUNT}" in conf
    # JetStream (the usage-event stream) for the users the callout places in APP, and for no other account.
    assert re.search(rf"^\s+{accounts.APP_ACCOUNT} \{{ jetstream: enabled \}}$", conf, re.M)
    assert conf.count("jetstream: enabled") == 1


def test_nats_runs_clustered_jetstream_and_the_control_plane_keeps_3_copies(rendered: dict[str, list[Obj]]) -> None:
    for overlay, objects in rendered.items():
        config = next(c for c in _kind(objects, "ConfigMap") if c["metadata"]["name"] == "nats-config")
        conf = config["data"]["nats.conf"]
        # Clustered JetStream needs a name per node (the pod's) and the cluster's name.
        assert "server_name: $POD_NAME" in conf, overlay
        assert re.search(r"^cluster \{\n  name: ", conf, re.M), overlay
        assert re.search(r'^jetstream \{\n  store_dir: "/data/', conf, re.M), overlay
        (sts,) = _kind(objects, "StatefulSet")
        env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        # Room for the usage stream twice over: nats-server counts its reservation again when a replica
        # re-creates it (services/usage/ledger.py), and "insufficient storage" would stop the gateways.
        file_store = re.search(r"max_file_store: (\d+)MB", conf)
        assert file_store, overlay
        assert int(file_store.group(1)) << 20 >= 2 * ledger.MAX_BYTES, overlay
        cp = next(c for c in _kind(objects, "ConfigMap") if "MP_NATS_ACCOUNT" in c.get("data", {}))
        assert cp["data"]["MP_USAGE_STREAM_REPLICAS"] == str(min(3, sts["spec"]["replicas"])), overlay
