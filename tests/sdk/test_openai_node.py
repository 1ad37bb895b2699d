"""The official `openai` npm package, driven by Node's test runner (tests/sdk/node/*.test.mjs).

The package is installed from the npm registry into the test cache on first use
(and reused after). Skipped, saying why, only when the registry cannot be reached.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from infra.components import Child
from tests.support.script_model import SCRIPT_MODEL
from tests.support.stack import TINY_MODEL, Stack

# The major version the tests are written against; npm picks its newest release.
OPENAI_NPM = "openai@7"
HERE = Path(__file__).resolve().parent


def _npm(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["npm", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def openai_package(model_cache: Path) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    prefix = model_cache / "npm" / OPENAI_NPM.replace("@", "-")
    package = prefix / "node_modules" / "openai"
    prefix.mkdir(parents=True, exist_ok=True)
    with (prefix / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers: one installs, the others wait
        _install(prefix, package)
    return package


def _install(prefix: Path, package: Path) -> None:
    if not (package / "package.json").exists():
        done = _npm(["install", "--prefix", str(prefix), OPENAI_NPM, "--no-audit", "--no-fund"], prefix, 300)
        if done.returncode != 0:
            if _npm(["ping"], prefix, 60).returncode != 0:
                pytest.skip(f"the npm registry is unreachable, so {OPENAI_NPM} cannot be installed")
            raise AssertionError(f"npm install {OPENAI_NPM} failed:\n{done.stdout}\n{done.stderr}")


def test_openai_node_sdk(stack: Stack, script_daemon: Child, openai_package: Path) -> None:
    version = json.loads((openai_package / "package.json").read_text())["version"]
    env = {
        **os.environ,
        "MP_OPENAI_PACKAGE": str(openai_package),
        "OPENAI_BASE_URL": stack.v1,
        "OPENAI_API_KEY": stack.api_key,
        "MP_TEXT_MODEL": TINY_MODEL,
        "MP_TOOL_MODEL": SCRIPT_MODEL,
    }
    tests = sorted(str(p) for p in (HERE / "node").glob("*.test.mjs"))
    run = subprocess.run(
        ["node", "--test", "--test-reporter=spec", *tests],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, f"openai {version} for Node:\n{run.stdout}\n{run.stderr}"
    assert "fail 0" in run.stdout
    assert re.search(r"pass [1-9]", run.stdout), run.stdout
