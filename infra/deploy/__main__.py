"""`python -m infra.deploy render <overlay> [-o DIR] [--image IMAGE]`: the Kubernetes manifests as YAML.

Without -o, one multi-document stream on stdout (`| kubectl apply -f -`); with -o,
one file per object in DIR (`kubectl apply -f DIR`). The overlays are in
infra/deploy/overlays/; see the README's "Deploy to Kubernetes".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from infra.deploy.k8s import render


def dump(objects: list[dict[str, object]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False, width=120)


def write_dir(objects: list[dict[str, object]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    # A previous render's files go: an object the overlay no longer has must not be applied again.
    for old in out.glob("[0-9][0-9]-*.yaml"):
        old.unlink()
    written = []
    for i, obj in enumerate(objects):
        meta = obj["metadata"]
        assert isinstance(meta, dict)
        path = out / f"{i:02d}-{str(obj['kind']).lower()}-{meta['name']}.yaml"
        path.write_text(yaml.safe_dump(obj, sort_keys=False, width=120))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("render", help="render the Kubernetes manifests of an overlay")
    cmd.add_argument("overlay", help="an overlay name in infra/deploy/overlays (dev, production) or a path")
    cmd.add_argument("-o", "--out", type=Path, help="write one file per object into this folder")
    cmd.add_argument("--image", help="the control plane's image (overrides the overlay's)")
    args = parser.parse_args(argv)
    objects = render(args.overlay, image=args.image)
    if args.out:
        paths = write_dir(objects, args.out)
        print(f"wrote {len(paths)} objects to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(dump(objects))
    return 0


if __name__ == "__main__":
    sys.exit(main())
