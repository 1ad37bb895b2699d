"""Daemon settings, read once from the environment (and an optional config file) into a frozen object.

The config file (`MP_CONFIG`, or `serve --config`) holds `KEY=value` lines with
the same names as the environment; the environment wins, so `brew services`
can run the daemon from a file the owner edits while a shell can still
override one setting for a try.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from daemon import credentials
from schemas import bus, subjects
from schemas import env as env_vars
from schemas.redact import REDACTED, redact_url
from schemas.tracing import TracingConfig, TracingSettingsError, config_from_env

# The admin token's file name in the state folder (MP_ADMIN_TOKEN_FILE overrides the whole path).
ADMIN_TOKEN_FILE_NAME = "admin-token"


class SettingsError(ValueError):
    pass


def _default_provider_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", platform.node().split(".")[0]) or "mac"
    return host[:64]


def _default_slots() -> int:
    # Metal decodes many sequences in one pass nearly for free; a CPU runs out of cores sooner.
    return 8 if platform.system() == "Darwin" else 4


def default_state_dir(env: Mapping[str, str]) -> Path:
    """Where the daemon keeps its own files (admin token, models) when MP_STATE_DIR is unset.

    Per user, so `brew services` (which runs as the owner) and the owner's shell agree on it.
    """
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    if platform.system() == "Darwin":
        return home / "Library" / "Application Support" / "mac-provider"
    state = Path(env["XDG_STATE_HOME"]) if env.get("XDG_STATE_HOME") else home / ".local" / "state"
    return state / "mac-provider"


def read_config_file(path: Path) -> dict[str, str]:
    """`KEY=value` lines; blank lines and `#` comments are skipped, quotes around values removed."""
    values: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from None
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"{path}:{number}: expected KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def merged_env(env: Mapping[str, str] | None = None, config_file: Path | None = None) -> dict[str, str]:
    """The environment over the config file (`config_file`, or MP_CONFIG): what every command reads."""
    merged = dict(os.environ if env is None else env)
    file_path = config_file or (Path(merged["MP_CONFIG"]).expanduser() if merged.get("MP_CONFIG") else None)
    if file_path is not None:
        merged = {**read_config_file(file_path), **merged}
    return merged


def state_dir_of(env: Mapping[str, str]) -> Path:
    """MP_STATE_DIR, or the per-user default."""
    return (Path(env["MP_STATE_DIR"]) if env.get("MP_STATE_DIR") else default_state_dir(env)).expanduser().resolve()


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    # May carry user:password (shown only through redact_url).
    nats_url: str = field(metadata={"url": True})
    provider_id: str
    # "mlx" runs the model; "synthetic" is the benchmark's stand-in and never a model.
    engine: str
    model_path: Path | None
    model_id: str
    queue_limit: int
    heartbeat_s: float
    # Seconds a stopping daemon waits for in-flight requests before giving up on them
    # (launchd kills 20 s after SIGTERM; the default leaves room to leave the pool).
    drain_timeout_s: float
    log_json: bool
    log_level: str
    # Local HTTP on 127.0.0.1 only; 0 turns the listener off.
    admin_port: int = 11441
    api_port: int = 11440
    # How long a local request's body may take to arrive after its headers (daemon/http_guard.py).
    body_timeout_s: float = 30.0
    # Sequences decoded together in one batch (reported to the pool as slots).
    slots: int = 4
    # The synthetic engine only: seconds between its tokens (0: as fast as it can), so the
    # benchmarks can hold streams open at a model's pace (`just bench scale`).
    synthetic_token_delay_s: float = 0.0
    # The synthetic engine only: tokens it hands over together per step (a batch's decode step).
    synthetic_tokens_per_step: int = 1
    # The synthetic engine only: requests it runs at once (`just bench hotpath` holds 2,000 slow streams).
    synthetic_slots: int = 256
    # Stop the worker (returning its memory) after this long without requests; 0: never.
    idle_unload_s: float = 600.0
    # Memory the model may use: weights + KV cache + transients. None: a share of this Mac's RAM.
    memory_budget_bytes: int | None = None
    prompt_cache_entries: int = 16
    prompt_cache_bytes: int = 1 << 30
    # Prompt tokens processed per step: smaller interleaves long prompts with decoding sooner.
    prefill_step: int = 512
    # A lone new prompt waits up to this share of its expected prefill time for others to
    # prefill with it (requests arriving together then start together); 0: never wait.
    prefill_gather: float = 0.05
    worker_start_timeout_s: float = 120.0
    # A worker holding requests with no progress for this long is killed and restarted; 0: never.
    worker_stall_s: float = 60.0
    # Chat templates and JSON schemas run in this many helper processes, each job killed after
    # prepare_timeout_s (keep it under the gateway's MP_ACCEPT_TIMEOUT_S, 2 s by default: the
    # gateway waits no longer for the provider to accept).
    prepare_helpers: int = 2
    prepare_timeout_s: float = 1.5
    # This provider's NATS user and password (the pool operator issues them); empty: none.
    nats_user: str = ""
    nats_password: str = field(default="", metadata={"secret": True})
    # The `mpp_` provider token (from `login`'s credentials file, or MP_PROVIDER_TOKEN): what the
    # pool's NATS auth callout checks; it also fixes the provider id.
    provider_token: str = field(default="", metadata={"secret": True})
    # A NATS .creds file (the provider's identity on the pool); None: the URL alone.
    nats_creds: Path | None = None
    # The daemon's own files. `/admin/load` loads only folders inside models_dir (a page or a
    # local process must not make the daemon read arbitrary paths); MP_MODEL_PATH is the
    # owner's own configuration and may be anywhere.
    state_dir: Path = Path(".")
    models_dir: Path = Path("models")
    # The admin API's bearer token (0600, made at first start).
    admin_token_file: Path = Path("admin-token")
    # OpenTelemetry traces (MP_OTEL_EXPORTER, schemas/tracing.py); off by default.
    tracing: TracingConfig = field(default_factory=TracingConfig)

    @property
    def nats_url_redacted(self) -> str:
        """NATS_URL as logs and answers may show it."""
        return redact_url(self.nats_url)

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                value = REDACTED if value else ""
            elif f.metadata.get("url"):
                value = redact_url(value)
            parts.append(f"{f.name}={value!r}")
        return f"DaemonSettings({', '.join(parts)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, config_file: Path | None = None) -> DaemonSettings:
        env = merged_env(env, config_file)
        engine = env.get("MP_ENGINE", "mlx")
        if engine not in ("mlx", "synthetic"):
            raise SettingsError(f"MP_ENGINE must be 'mlx' or 'synthetic', got {engine!r}")
        raw_path = env.get("MP_MODEL_PATH")
        model_path = Path(raw_path).expanduser().resolve() if raw_path else None
        model_id = env.get("MP_MODEL_ID") or (model_path.name if model_path else "synthetic")
        state_dir = state_dir_of(env)
        signed_in = _signed_in(env, state_dir)
        provider_id = env.get("MP_PROVIDER_ID") or (signed_in.provider_id if signed_in else _default_provider_id())
        models_dir = Path(env["MP_MODELS_DIR"]).expanduser().resolve() if env.get("MP_MODELS_DIR") else None
        token_file = Path(env["MP_ADMIN_TOKEN_FILE"]).expanduser() if env.get("MP_ADMIN_TOKEN_FILE") else None
        if not subjects.valid_token(provider_id):
            raise SettingsError(f"MP_PROVIDER_ID {provider_id!r}: use 1-64 of A-Z a-z 0-9 _ -")
        try:
            budget_gb = env_vars.number(env, "MP_MEMORY_BUDGET_GB", 0.0)
            settings = cls(
                nats_url=env.get("NATS_URL") or (signed_in.nats_url if signed_in else "nats://127.0.0.1:4222"),
                provider_id=provider_id,
                engine=engine,
                model_path=model_path,
                model_id=model_id,
                queue_limit=env_vars.integer(env, "MP_QUEUE_LIMIT", 16),
                heartbeat_s=env_vars.number(env, "MP_HEARTBEAT_S", 1.0),
                drain_timeout_s=env_vars.number(env, "MP_DRAIN_TIMEOUT_S", 15),
                log_json=env.get("MP_LOG_FORMAT", "console") == "json",
                log_level=env.get("MP_LOG_LEVEL", "info"),
                admin_port=env_vars.integer(env, "MP_ADMIN_PORT", 11441),
                api_port=env_vars.integer(env, "MP_API_PORT", 11440),
                body_timeout_s=env_vars.number(env, "MP_BODY_TIMEOUT_S", 30),
                slots=env_vars.integer(env, "MP_SLOTS", _default_slots()),
                synthetic_token_delay_s=env_vars.number(env, "MP_SYNTHETIC_TOKEN_DELAY_S", 0),
                synthetic_tokens_per_step=env_vars.integer(env, "MP_SYNTHETIC_TOKENS_PER_STEP", 1),
                synthetic_slots=env_vars.integer(env, "MP_SYNTHETIC_SLOTS", 256),
                idle_unload_s=env_vars.number(env, "MP_IDLE_UNLOAD_S", 600),
                memory_budget_bytes=int(budget_gb * (1 << 30)) if env.get("MP_MEMORY_BUDGET_GB") else None,
                prompt_cache_entries=env_vars.integer(env, "MP_PROMPT_CACHE_ENTRIES", 16),
                prompt_cache_bytes=int(env_vars.number(env, "MP_PROMPT_CACHE_GB", 1) * (1 << 30)),
                prefill_step=env_vars.integer(env, "MP_PREFILL_STEP", 512),
                prefill_gather=env_vars.number(env, "MP_PREFILL_GATHER", 0.05),
                worker_start_timeout_s=env_vars.number(env, "MP_WORKER_START_TIMEOUT_S", 120),
                worker_stall_s=env_vars.number(env, "MP_WORKER_STALL_S", 60),
                prepare_helpers=env_vars.integer(env, "MP_PREPARE_HELPERS", 2),
                prepare_timeout_s=env_vars.number(env, "MP_PREPARE_TIMEOUT_S", 1.5),
                nats_user=env.get("MP_NATS_USER", ""),
                nats_password=env.get("MP_NATS_PASSWORD", ""),
                provider_token=env.get("MP_PROVIDER_TOKEN") or (signed_in.token if signed_in else ""),
                nats_creds=Path(env["MP_NATS_CREDS"]).expanduser() if env.get("MP_NATS_CREDS") else None,
                state_dir=state_dir,
                models_dir=models_dir or state_dir / "models",
                admin_token_file=(token_file or state_dir / ADMIN_TOKEN_FILE_NAME).absolute(),
                tracing=config_from_env(env),
            )
        except TracingSettingsError as exc:
            raise SettingsError(str(exc)) from None
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if not settings.prepare_timeout_s > 0:
            raise SettingsError(f"MP_PREPARE_TIMEOUT_S must be positive, got {settings.prepare_timeout_s}")
        for name, value in (
            ("MP_SLOTS", settings.slots),
            ("MP_PREFILL_STEP", settings.prefill_step),
            ("MP_PREPARE_HELPERS", settings.prepare_helpers),
        ):
            if value < 1:
                raise SettingsError(f"{name} must be at least 1, got {value}")
        if not bus.MIN_HEARTBEAT_S <= settings.heartbeat_s <= bus.MAX_HEARTBEAT_S:
            raise SettingsError(
                f"MP_HEARTBEAT_S must be between {bus.MIN_HEARTBEAT_S:g} and {bus.MAX_HEARTBEAT_S:g}, "
                f"got {settings.heartbeat_s}"
            )
        if not 0 <= settings.synthetic_token_delay_s <= 10:
            raise SettingsError(
                f"MP_SYNTHETIC_TOKEN_DELAY_S must be between 0 and 10, got {settings.synthetic_token_delay_s}"
            )
        if not 1 <= settings.synthetic_slots <= bus.MAX_SLOTS:
            raise SettingsError(
                f"MP_SYNTHETIC_SLOTS must be between 1 and {bus.MAX_SLOTS}, got {settings.synthetic_slots}"
            )
        if not 1 <= settings.synthetic_tokens_per_step <= 4096:
            raise SettingsError(
                f"MP_SYNTHETIC_TOKENS_PER_STEP must be between 1 and 4096, got {settings.synthetic_tokens_per_step}"
            )
        if not 1 <= settings.body_timeout_s <= 600:
            raise SettingsError(f"MP_BODY_TIMEOUT_S must be between 1 and 600, got {settings.body_timeout_s}")
        if not 0 <= settings.prefill_gather <= 1:
            raise SettingsError(f"MP_PREFILL_GATHER must be between 0 and 1, got {settings.prefill_gather}")
        for name, port in (("MP_ADMIN_PORT", settings.admin_port), ("MP_API_PORT", settings.api_port)):
            if not 0 <= port < 65536:
                raise SettingsError(f"{name} must be a TCP port (0 turns it off), got {port}")
        if env.get("MP_NATS_PLAINTEXT", "") != "allow" and (clear := plaintext_remote(settings.nats_url)):
            raise SettingsError(
                f"NATS_URL: {clear} is another machine over plain nats://, where this Mac's credentials "
                "would cross the network in clear: use tls:// (set MP_NATS_PLAINTEXT=allow only on a network you trust)"
            )
        if signed_in is not None and settings.provider_id != signed_in.provider_id and not env.get("MP_PROVIDER_TOKEN"):
            raise SettingsError(
                f"MP_PROVIDER_ID {settings.provider_id!r} is not the id this Mac signed in as "
                f"({signed_in.provider_id!r}): unset it, or run `mac-provider-daemon login` again"
            )
        return settings


def is_loopback(host: str) -> bool:
    """This machine (localhost or a loopback address): nothing sent there crosses a network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plaintext_remote(nats_url: str) -> str | None:
    """The first server of `nats_url` (comma-separated) reached over plain nats:// on another machine."""
    for server in nats_url.split(","):
        parts = urlsplit(server.strip())
        if parts.scheme in ("nats", "ws", "") and not is_loopback(parts.hostname or ""):
            return f"{parts.hostname}:{parts.port or 4222}"
    return None


def credentials_path(env: Mapping[str, str], state_dir: Path) -> Path:
    """Where `login` keeps this Mac's provider credentials (MP_PROVIDER_CREDENTIALS overrides)."""
    if env.get("MP_PROVIDER_CREDENTIALS"):
        return Path(env["MP_PROVIDER_CREDENTIALS"]).expanduser().absolute()
    return state_dir / credentials.FILE_NAME


def _signed_in(env: Mapping[str, str], state_dir: Path) -> credentials.ProviderCredentials | None:
    try:
        return credentials.load(credentials_path(env, state_dir))
    except credentials.CredentialsError as exc:
        raise SettingsError(str(exc)) from None
