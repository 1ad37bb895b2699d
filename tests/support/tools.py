"""Command-line tools the suite runs from virtualenvs of their own, made once and kept in the test cache.

checkov (the Kubernetes policy linter) pins packaging<24 and dozens of other
packages; installed beside the suite it would downgrade what pytest needs. Its
venv is made on first use (about 20 s) and reused by every later run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

CHECKOV = "checkov==3.3.30"
_READY = ".complete"


def cache_dir() -> Path:
    repo = Path(__file__).resolve().parent.parent.parent
    return Path(os.environ.get("MP_TEST_CACHE", repo / ".mp" / "test-cache")) / "tools"


def tool(requirement: str, command: str) -> Path:
    """The path of `command`, installed with pip from `requirement` into a venv of its own."""
    venv = cache_dir() / requirement.replace("==", "-")
    exe = venv / "bin" / command
    if (venv / _READY).exists() and exe.exists():
        return exe
    venv.parent.mkdir(parents=True, exist_ok=True)
    # Parallel test workers: one makes the venv, the others wait for it.
    with (venv.parent / f".{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / _READY).exists() and exe.exists():
            return exe
        return _make(venv, requirement, exe)


def _make(venv: Path, requirement: str, exe: Path) -> Path:
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", requirement],
        check=True,
        timeout=600,
    )
    (venv / _READY).write_text(requirement)
    return exe


def checkov() -> Path:
    return tool(CHECKOV, "checkov")


def checkov_env() -> dict[str, str]:
    """checkov offline: no calls home for its guideline mappings or downloads, no proxy to reach them either."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        {
            "BC_SKIP_MAPPING": "TRUE",
            "CHECKOV_SKIP_DOWNLOAD": "TRUE",
            # Anything that still tried would go nowhere.
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "",
            "LOG_LEVEL": "WARNING",
        }
    )
    return env
