"""Daemon settings, read once from the environment into a frozen object."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from schemas import subjects


class SettingsError(ValueError):
    pass


def _default_provider_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", platform.node().split(".")[0]) or "mac"
    return host[:64]


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    nats_url: str
    provider_id: str
    # "mlx" runs the model; "synthetic" is the benchmark's stand-in and never a model.
    engine: str
    model_path: Path | None
    model_id: str
    queue_limit: int
    heartbeat_s: float
    # Seconds a stopping daemon waits for in-flight requests before giving up on them.
    drain_timeout_s: float
    log_json: bool
    log_level: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DaemonSettings:
        env = os.environ if env is None else env
        engine = env.get("MP_ENGINE", "mlx")
        if engine not in ("mlx", "synthetic"):
            raise SettingsError(f"MP_ENGINE must be 'mlx' or 'synthetic', got {engine!r}")
        raw_path = env.get("MP_MODEL_PATH")
        model_path = Path(raw_path).expanduser().resolve() if raw_path else None
        if engine == "mlx" and model_path is None:
            raise SettingsError("MP_MODEL_PATH must name an mlx-lm model folder")
        model_id = env.get("MP_MODEL_ID") or (model_path.name if model_path else "synthetic")
        provider_id = env.get("MP_PROVIDER_ID") or _default_provider_id()
        if not subjects.valid_token(provider_id):
            raise SettingsError(f"MP_PROVIDER_ID {provider_id!r}: use 1-64 of A-Z a-z 0-9 _ -")
        try:
            return cls(
                nats_url=env.get("NATS_URL", "nats://127.0.0.1:4222"),
                provider_id=provider_id,
                engine=engine,
                model_path=model_path,
                model_id=model_id,
                queue_limit=int(env.get("MP_QUEUE_LIMIT", "16")),
                heartbeat_s=float(env.get("MP_HEARTBEAT_S", "1.0")),
                drain_timeout_s=float(env.get("MP_DRAIN_TIMEOUT_S", "20")),
                log_json=env.get("MP_LOG_FORMAT", "console") == "json",
                log_level=env.get("MP_LOG_LEVEL", "info"),
            )
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
