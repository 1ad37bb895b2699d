"""The image's pinned, hash-checked Python packages: `python -m infra.deploy.lock` rewrites them.

The control plane needs pyproject's dependencies less the daemon's (mlx and
friends run on the Macs, never in the cloud). pip resolves them against PyPI
for the image's Python on both architectures the image is built for, wheels
only (no compiler in the image), and this writes every pin with the hashes of
both architectures' wheels. A pure-Python package PyPI has no wheel of
(SOURCE_ONLY) is pinned by its source archive's hash and built in the image's
build stage with the pinned setuptools, nothing downloaded at build time:

- `requirements.txt`: what the image runs (installed with `--require-hashes --no-deps`);
- `build-requirements.txt`: what builds our own wheel in the build stage (setuptools).

Run it after changing pyproject's dependencies or the base image's Python
(`tests/test_deploy_image.py` fails until you do).
"""

from __future__ import annotations

import email
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
REQUIREMENTS = HERE / "requirements.txt"
BUILD_REQUIREMENTS = HERE / "build-requirements.txt"

# The base image's Python (infra/deploy/Dockerfile) and the glibc of its Debian (bookworm: 2.36).
PYTHON = "3.12"
GLIBC_MINOR = 36
ARCHES = ("x86_64", "aarch64")
# Dependencies of the daemon alone: the control plane never imports them.
DAEMON_ONLY = frozenset({"mlx", "mlx-lm", "tokenizers"})
# Pure-Python packages published only as source (nkeys, the auth callout's key format).
SOURCE_ONLY = frozenset({"nkeys"})


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return normalize(match.group(1))


def control_plane_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """pyproject's dependencies the control plane needs, as written there (markers of other systems dropped)."""
    deps: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [d for d in deps if requirement_name(d) not in DAEMON_ONLY]


def build_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    requires: list[str] = tomllib.loads(pyproject.read_text())["build-system"]["requires"]
    return requires


def _resolve(requirements: list[str], arch: str) -> dict[str, tuple[str, str]]:
    """{name: (version, sha256)} of the wheels pip picks for the image's Python on `arch`."""
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(17, GLIBC_MINOR + 1)]
    platforms += [f"manylinux2014_{arch}", f"manylinux1_{arch}", f"linux_{arch}"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                # PyPI itself, whatever this machine's pip configuration adds.
                "--isolated",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--only-binary=:all:",
                f"--python-version={PYTHON}",
                "--implementation=cp",
                f"--abi=cp{PYTHON.replace('.', '')}",
                "--abi=abi3",
                "--abi=none",
                *(f"--platform={p}" for p in platforms),
                f"--report={report}",
                *requirements,
            ],
            check=True,
        )
        installs = json.loads(report.read_text())["install"]
    found = {}
    for item in installs:
        wheel = item["download_info"]["archive_info"]["hashes"]["sha256"]
        found[normalize(item["metadata"]["name"])] = (item["metadata"]["version"], wheel)
    return found


def _source(requirement: str) -> tuple[str, str, list[str]]:
    """(version, sha256, its dependencies) of a source-only package's archive."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--isolated",
                "--quiet",
                "--no-deps",
                "--no-binary=:all:",
                "--dest",
                tmp,
                requirement,
            ],
            check=True,
        )
        (archive,) = Path(tmp).iterdir()
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        with tarfile.open(archive) as tar:
            info = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
            extracted = tar.extractfile(info)
            assert extracted is not None
            meta = email.message_from_bytes(extracted.read())
    return meta["Version"], digest, meta.get_all("Requires-Dist") or []


def _entry(name: str, version: str, hashes: list[str]) -> list[str]:
    lines = [f"{name}=={version} \\"]
    lines.extend(f"    --hash=sha256:{h}" + (" \\" if i < len(hashes) - 1 else "") for i, h in enumerate(hashes))
    return lines


def lock(requirements: list[str]) -> str:
    sources = {requirement_name(r): _source(r) for r in requirements if requirement_name(r) in SOURCE_ONLY}
    binary = [r for r in requirements if requirement_name(r) not in SOURCE_ONLY]
    binary += [dep for _, _, deps in sources.values() for dep in deps]
    by_arch = {arch: _resolve(binary, arch) for arch in ARCHES}
    names = sorted(set().union(*by_arch.values(), sources))
    lines = [
        "# Generated by `python -m infra.deploy.lock`: do not edit by hand.",
        f"# CPython {PYTHON}, Linux {' and '.join(ARCHES)} (glibc <= 2.{GLIBC_MINOR}).",
        # Wheels only, but for the pure-Python packages PyPI has as source alone (built with the pinned setuptools).
        "--only-binary :all:",
        *(f"--no-binary {name}" for name in sorted(sources)),
    ]
    for name in names:
        if name in sources:
            version, digest, _ = sources[name]
            lines += _entry(name, version, [digest])
            continue
        pins = {arch: found[name] for arch, found in by_arch.items() if name in found}
        versions = {version for version, _ in pins.values()}
        if len(pins) != len(ARCHES) or len(versions) != 1:
            raise SystemExit(f"{name}: resolved differently per architecture: {pins}")
        lines += _entry(name, versions.pop(), sorted({digest for _, digest in pins.values()}))
    return "\n".join(lines) + "\n"


def pinned(path: Path = REQUIREMENTS) -> dict[str, str]:
    """{name: version} of a lock file this module wrote."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line)
        if match:
            found[normalize(match.group(1))] = match.group(2)
    return found


def main() -> int:
    REQUIREMENTS.write_text(lock(control_plane_requirements()))
    BUILD_REQUIREMENTS.write_text(lock(build_requirements()))
    count = len(pinned(REQUIREMENTS))
    print(f"wrote {REQUIREMENTS.relative_to(ROOT)} ({count} packages) and {BUILD_REQUIREMENTS.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
