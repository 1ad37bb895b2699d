"""Control-plane settings, read once from the environment into a frozen object."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/macprovider"


class SettingsError(ValueError):
    pass


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{key} must be a number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{key} must be positive, got {raw!r}")
    return value


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{key} must be an integer, got {raw!r}") from None


@dataclass(frozen=True, slots=True)
class Settings:
    home: Path
    host: str
    port: int
    database_url: str
    nats_url: str
    # Identifies this replica on the bus; replies for its requests come to its own subject.
    gateway_id: str
    # Whole-request ceiling enforced by the gateway (seed 000: deployment-configured).
    request_timeout_s: float
    # How long a chosen provider has to acknowledge a request before we try elsewhere.
    accept_timeout_s: float
    # Longest silence tolerated between two frames of a running stream.
    stream_idle_timeout_s: float
    # max_tokens when the buyer sends none.
    default_max_tokens: int
    # A provider missing this many heartbeat intervals leaves the pool view.
    heartbeat_misses: int
    db_pool_size: int
    log_json: bool
    log_level: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("MP_HOME", ".mp")).expanduser().resolve()
        gateway_id = env.get("MP_GATEWAY_ID") or f"gw-{secrets.token_hex(4)}"
        return cls(
            home=home,
            host=env.get("MP_HOST", "127.0.0.1"),
            port=_int(env, "MP_PORT", 8080),
            database_url=env.get("DATABASE_URL", DEFAULT_DATABASE_URL),
            nats_url=env.get("NATS_URL", DEFAULT_NATS_URL),
            gateway_id=gateway_id,
            request_timeout_s=_float(env, "MP_REQUEST_TIMEOUT_S", 600.0),
            accept_timeout_s=_float(env, "MP_ACCEPT_TIMEOUT_S", 2.0),
            stream_idle_timeout_s=_float(env, "MP_STREAM_IDLE_TIMEOUT_S", 120.0),
            default_max_tokens=_int(env, "MP_DEFAULT_MAX_TOKENS", 1024),
            heartbeat_misses=_int(env, "MP_HEARTBEAT_MISSES", 3),
            db_pool_size=_int(env, "MP_DB_POOL_SIZE", 10),
            log_json=env.get("MP_LOG_FORMAT", "console") == "json",
            log_level=env.get("MP_LOG_LEVEL", "info"),
        )
