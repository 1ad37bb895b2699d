"""The Kubernetes manifests, rendered from Python: `python -m infra.deploy render <overlay>`.

Plain objects, no templating language: each module builds one part (network.py,
nats.py, control_plane.py) from the overlay's values (values.py), then the
overlay's patches and policy waivers are applied. The output is ordinary YAML
for `kubectl apply`.
"""

from __future__ import annotations

from infra.deploy.k8s import control_plane, nats, network
from infra.deploy.k8s.common import Obj
from infra.deploy.k8s.values import apply_patches, load_overlay, values_of

WORKLOADS = frozenset({"Deployment", "StatefulSet", "Job"})


def render(overlay_name: str, *, image: str | None = None) -> list[Obj]:
    overlay = load_overlay(overlay_name)
    values = values_of(overlay)
    if image:
        values["image"] = image
    objects = [*network.objects(values), *nats.objects(values), *control_plane.objects(values)]
    objects = apply_patches(objects, overlay.get("patches") or [])
    skips = overlay.get("checkovSkips") or []
    for obj in objects:
        if obj["kind"] in WORKLOADS and skips:
            annotations = obj["metadata"].setdefault("annotations", {})
            start = len(annotations) + 1
            for i, skip in enumerate(skips, start):
                if not skip.get("reason"):
                    raise ValueError(f"checkovSkips: {skip.get('check')} has no reason")
                annotations[f"checkov.io/skip{i}"] = f"{skip['check']}={skip['reason']}"
    return objects
