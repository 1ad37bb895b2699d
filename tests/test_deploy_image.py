"""The control plane's image definition (infra/deploy/Dockerfile): linted, and its pinned packages kept in step.

No image is built here (no registry to pull the base from); what can be checked
without one is: hadolint finds nothing, the image runs what the README and the
manifests say, and its lock pins every control-plane dependency of pyproject,
at a version pyproject accepts, with hashes, and nothing of the daemon's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from infra.deploy import lock

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "infra" / "deploy" / "Dockerfile"


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", str(path)], capture_output=True, text=True, timeout=60
    )


def test_hadolint_finds_nothing() -> None:
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_a_careless_dockerfile(tmp_path: Path) -> None:
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install litestar\nCMD python -m services serve\n")
    result = _hadolint(careless)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3025"):  # :latest, unpinned pip, shell-form CMD
        assert rule in result.stdout, result.stdout


def test_the_image_is_pinned_non_root_json_logging_and_probed() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base is not None
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", base.group(1)), base.group(1)
    # The lock is for the base image's Python.
    assert base.group(1).startswith(f"python:{lock.PYTHON}.")
    final = text[text.rindex("\nFROM ") :]
    assert "USER 10001:10001" in final
    assert "MP_LOG_FORMAT=json" in final
    assert "/healthz/ready" in final
    assert 'ENTRYPOINT ["mac-provider"]' in final
    # No compiler, no pip cache, no build venv in the final stage: only the runtime venv is copied.
    assert re.findall(r"COPY --from=\S+ (\S+)", final) == ["/opt/mp"]


def test_the_lock_pins_every_control_plane_dependency_with_hashes() -> None:
    pins = lock.pinned(lock.REQUIREMENTS)
    for raw in lock.control_plane_requirements():
        req = Requirement(raw)
        name = lock.normalize(req.name)
        assert name in pins, f"{name} is not in {lock.REQUIREMENTS.name}: run `python -m infra.deploy.lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy pyproject's {req.specifier}: run `python -m infra.deploy.lock`"
        )
    assert not set(pins) & {"mlx", "mlx-lm", "mlx-metal", "tokenizers", "transformers", "torch", "numpy"}
    # Every pin is followed by its hashes (pip's --require-hashes refuses anything less).
    blocks = re.findall(
        r"^\S+==\S+ \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", lock.REQUIREMENTS.read_text(), re.M
    )
    assert len(blocks) == len(pins)
    # Wheels only, but for the named pure-Python packages published as source alone.
    options = [line for line in lock.REQUIREMENTS.read_text().splitlines() if line.startswith("--")]
    assert options[0] == "--only-binary :all:"
    assert {o.removeprefix("--no-binary ") for o in options[1:]} <= lock.SOURCE_ONLY
    build = lock.pinned(lock.BUILD_REQUIREMENTS)
    for raw in tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]:
        req = Requirement(raw)
        assert req.specifier.contains(build[lock.normalize(req.name)]), raw


def test_the_build_context_is_only_what_the_image_needs() -> None:
    lines = [p for p in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines() if p and p[0] != "#"]
    assert lines[0] == "*"  # everything is left out but what is named after it
    kept = {p.removeprefix("!").rstrip("/") for p in lines if p.startswith("!")}
    assert kept == {
        "pyproject.toml",
        "README.md",
        "schemas",
        "services",
        "infra/deploy/requirements.txt",
        "infra/deploy/build-requirements.txt",
    }
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M))
    assert {src for line in copied for src in line.split()} <= kept
