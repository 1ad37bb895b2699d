"""LiteLLM's proxy (from PyPI, in a virtualenv of its own: its pins would fight the suite's), the baseline
the scale benchmark puts beside the gateway: the same requests through it to an equivalent upstream.

It runs with a master key and no database: LiteLLM's per-key budgets and spend tracking need its
Prisma client, whose engine binaries are downloaded at run time (no network here), so LiteLLM checks
the key and proxies, while the gateway also reserves quota and writes a ledger row per request.
"""

from __future__ import annotations

import os
import secrets
import time
import urllib.request
from pathlib import Path

from infra import procs
from infra.components import Child
from infra.ports import free_port
from tests.support.tools import tool

# The newest LiteLLM whose [proxy] extra installs from PyPI alone (later ones need a litellm-proxy wheel).
LITELLM = "litellm[proxy]==1.100.5"


def _offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        {
            # Its model price list ships in the wheel; it would fetch a newer one at import.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            # Anything that still tried to leave the machine would go nowhere; loopback stays direct.
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "127.0.0.1,localhost",
        }
    )
    return env


class LiteLLMProxy:
    def __init__(self, child: Child, port: int, key: str) -> None:
        self.child = child
        self.port = port
        self.key = key
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, home: Path, *, model: str, upstream: str, workers: int = 1, timeout: float = 120.0) -> LiteLLMProxy:
        """Proxy `model` to the OpenAI-compatible `upstream` (a base URL ending in /v1)."""
        exe = tool(LITELLM, "litellm")
        state = home / "litellm"
        state.mkdir(parents=True, exist_ok=True)
        key = f"sk-bench-{secrets.token_hex(12)}"
        config = state / "config.yaml"
        config.write_text(
            "\n".join(
                [
                    "model_list:",
                    f"  - model_name: {model}",
                    "    litellm_params:",
                    f"      model: openai/{model}",
                    f"      api_base: {upstream}",
                    "      api_key: none",
                    "general_settings:",
                    f"  master_key: {key}",
                    "litellm_settings:",
                    "  telemetry: false",
                    "",
                ]
            )
        )
        port = free_port()
        log_path = home / "logs" / "litellm.log"
        argv: list[str | os.PathLike[str]] = [
            exe,
            "--config",
            config,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            str(workers),
        ]
        child = Child("litellm", procs.spawn(argv, env=_offline_env(), log_path=log_path, cwd=state), log_path)
        proxy = cls(child, port, key)
        try:
            proxy._wait(timeout)
        except BaseException:
            child.stop()
            raise
        return proxy

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.child.alive():
                raise procs.ProcessExitedError(f"litellm exited while starting; log tail:\n{self.child.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health/liveliness", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"litellm not up after {timeout:.0f}s\n{self.child.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.child.stop()
