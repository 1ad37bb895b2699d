"""Control-plane settings, read once from the environment into a frozen object."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from schemas.private_file import write_private
from schemas.redact import REDACTED, redact_url

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


def _positive_int(env: Mapping[str, str], key: str, default: int) -> int:
    value = _int(env, key, default)
    if value < 1:
        raise SettingsError(f"{key} must be at least 1, got {value}")
    return value


def _bounded_int(env: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    value = _int(env, key, default)
    if not low <= value <= high:
        raise SettingsError(f"{key} must be between {low} and {high}, got {value}")
    return value


_SECRET_FILE = "secret_key"


def _secret_key(env: Mapping[str, str], home: Path) -> bytes:
    """MP_SECRET_KEY, or one generated once under MP_HOME (the local stack and its replicas share it)."""
    raw = env.get("MP_SECRET_KEY", "")
    if raw:
        if len(raw) < 32:
            raise SettingsError("MP_SECRET_KEY must be at least 32 characters")
        return raw.encode()
    path = home / _SECRET_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        # Not replacing: if another replica made the file first, everyone uses that one.
        with contextlib.suppress(FileExistsError):
            write_private(path, secrets.token_urlsafe(48), replace=False)
    return path.read_text().strip().encode()


# Field metadata: a secret is never shown; a URL is shown without its credentials.
SECRET = {"secret": True}
URL = {"url": True}


def _safe_fields(obj: Any) -> str:
    """`name=value, ...` of a settings dataclass for repr(), with secrets hidden (logs, tracebacks)."""
    parts = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("secret"):
            value = REDACTED if value else ""
        elif f.metadata.get("url"):
            value = redact_url(value)
        parts.append(f"{f.name}={value!r}")
    return ", ".join(parts)


def _choice(env: Mapping[str, str], key: str, choices: tuple[str, ...]) -> str:
    value = env.get(key) or choices[0]
    if value not in choices:
        raise SettingsError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    home: Path
    host: str
    port: int
    database_url: str = field(metadata=URL)
    nats_url: str = field(metadata=URL)
    # Identifies this replica on the bus; replies for its requests come to its own subject.
    gateway_id: str
    # Whole-request ceiling enforced by the gateway (seed 000: deployment-configured).
    request_timeout_s: float
    # How long a chosen provider has to acknowledge a request before we try elsewhere.
    accept_timeout_s: float
    # Longest silence tolerated between two frames of a running stream.
    stream_idle_timeout_s: float
    # A request with no first token this long after it was accepted moves to another provider.
    first_token_timeout_s: float
    # How many times a request may move to another provider when its provider is lost.
    max_failovers: int
    # A provider whose heartbeats stopped for this many intervals is lost to its running requests.
    lost_after_intervals: float
    # "least-loaded" (the rule in services/gateway/pool.py) or "random": only to measure the rule.
    routing: str
    # max_tokens when the buyer sends none.
    default_max_tokens: int
    # A provider missing this many heartbeat intervals leaves the pool view.
    heartbeat_misses: int
    # Where browsers reach us; GitHub redirects to `<public_url>/auth/github/callback`.
    public_url: str = field(metadata=URL)
    github_client_id: str
    github_client_secret: str = field(metadata=SECRET)
    # GitHub's endpoints; tests point them at a loopback server speaking the same protocol.
    github_authorize_url: str = field(metadata=URL)
    github_token_url: str = field(metadata=URL)
    github_api_url: str = field(metadata=URL)
    # Signs demo tokens; every replica must share it (generated under MP_HOME when unset).
    secret_key: bytes = field(metadata=SECRET)
    demo_token_ttl_s: float
    # Demo tokens one client IP may get per window, counted in Postgres across replicas;
    # an IPv6 client's whole /64 (one subscriber's network) has its own count, and the
    # whole deployment a global one.
    demo_tokens_per_ip: int
    demo_tokens_per_net64: int
    demo_tokens_global: int
    demo_window_s: float
    # Per-client budgets counted in each replica's memory (see services/auth/rate_limit.py):
    # key lookups that found nothing (each costs a query), and sign-ins started (each writes a row).
    failed_auth_per_min: int
    github_start_per_min: int
    # Clients each of those budgets remembers (the least recently seen are forgotten first).
    rate_limit_clients: int
    # Proxies in front of us that append to X-Forwarded-For (0: use the peer address).
    trusted_proxy_hops: int
    session_ttl_s: float
    oauth_state_ttl_s: float
    # Safety net for the key cache; revocations reach it at once through Postgres NOTIFY.
    key_cache_ttl_s: float
    key_cache_size: int
    # How often the batched `last_used_at` of keys is written.
    key_last_used_flush_s: float
    db_pool_size: int
    log_json: bool
    log_level: str
    # Default quotas per account (operators override per account) and per demo token.
    quota_requests_per_day: int
    quota_tokens_per_day: int
    quota_concurrent: int
    demo_quota_requests_per_day: int
    demo_quota_tokens_per_day: int
    demo_quota_concurrent: int
    # False only for measuring metering's own cost (`just bench metering`): no quotas, no ledger.
    metering: bool
    # A reservation its gateway stopped touching for this long is settled by another replica.
    reservation_stale_s: float
    # Stored Responses API answers (previous_response_id, GET) expire after this long.
    response_ttl_s: float
    # The largest conversation a stored response keeps (bytes of JSON).
    response_max_bytes: int
    # Unknown provider ids admitted per minute across all replicas (pinned ones need no room).
    provisional_admissions_per_min: int
    # Safety net for the per-replica admission cache; pins, bans and drains reach it at once by NOTIFY.
    admission_cache_ttl_s: float
    # The most slots a provider's heartbeat is believed to have (an operator raises it per provider).
    provider_max_slots: int
    # Protocol violations within the window that suspend a provider automatically (0: never).
    provider_violation_limit: int
    provider_violation_window_s: float
    # A model id with no entry in the operator's catalog: "refuse" (never routed; production) or
    # "allow" (routed unverified: a pool serving whatever its providers bring).
    uncatalogued_models: str
    # Canary checks of providers (services/canary/): on or off; the first one within
    # canary_join_delay_s of a provider joining (a random moment), then every canary_interval_s
    # on average (uniformly 0.5x to 1.5x); tokens each canary generates.
    canaries: bool
    canary_join_delay_s: float
    canary_interval_s: float
    canary_tokens: int
    # The control plane's NATS user (the local stack makes one); empty: NATS_URL alone.
    nats_user: str
    nats_password: str = field(metadata=SECRET)

    def __repr__(self) -> str:
        return f"Settings({_safe_fields(self)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("MP_HOME", ".mp")).expanduser().resolve()
        gateway_id = env.get("MP_GATEWAY_ID") or f"gw-{secrets.token_hex(4)}"
        port = _int(env, "MP_PORT", 8080)
        public_url = (env.get("MP_PUBLIC_URL") or f"http://127.0.0.1:{port}").rstrip("/")
        return cls(
            home=home,
            host=env.get("MP_HOST", "127.0.0.1"),
            port=port,
            database_url=env.get("DATABASE_URL", DEFAULT_DATABASE_URL),
            nats_url=env.get("NATS_URL", DEFAULT_NATS_URL),
            gateway_id=gateway_id,
            request_timeout_s=_float(env, "MP_REQUEST_TIMEOUT_S", 600.0),
            accept_timeout_s=_float(env, "MP_ACCEPT_TIMEOUT_S", 2.0),
            stream_idle_timeout_s=_float(env, "MP_STREAM_IDLE_TIMEOUT_S", 120.0),
            first_token_timeout_s=_float(env, "MP_FIRST_TOKEN_TIMEOUT_S", 60.0),
            max_failovers=_int(env, "MP_MAX_FAILOVERS", 2),
            lost_after_intervals=_float(env, "MP_LOST_AFTER_INTERVALS", 2.0),
            routing=_choice(env, "MP_ROUTING", ("least-loaded", "random")),
            default_max_tokens=_int(env, "MP_DEFAULT_MAX_TOKENS", 1024),
            heartbeat_misses=_int(env, "MP_HEARTBEAT_MISSES", 3),
            public_url=public_url,
            github_client_id=env.get("MP_GITHUB_CLIENT_ID", ""),
            github_client_secret=env.get("MP_GITHUB_CLIENT_SECRET", ""),
            github_authorize_url=env.get("MP_GITHUB_AUTHORIZE_URL", "https://github.com/login/oauth/authorize"),
            github_token_url=env.get("MP_GITHUB_TOKEN_URL", "https://github.com/login/oauth/access_token"),
            github_api_url=env.get("MP_GITHUB_API_URL", "https://api.github.com").rstrip("/"),
            secret_key=_secret_key(env, home),
            demo_token_ttl_s=_float(env, "MP_DEMO_TOKEN_TTL_S", 900.0),
            demo_tokens_per_ip=_int(env, "MP_DEMO_TOKENS_PER_IP", 10),
            demo_tokens_per_net64=_int(env, "MP_DEMO_TOKENS_PER_NET64", 20),
            demo_tokens_global=_int(env, "MP_DEMO_TOKENS_GLOBAL", 500),
            demo_window_s=_float(env, "MP_DEMO_WINDOW_S", 3600.0),
            failed_auth_per_min=_positive_int(env, "MP_FAILED_AUTH_PER_MIN", 30),
            github_start_per_min=_positive_int(env, "MP_GITHUB_START_PER_MIN", 10),
            rate_limit_clients=_positive_int(env, "MP_RATE_LIMIT_CLIENTS", 50_000),
            trusted_proxy_hops=_int(env, "MP_TRUSTED_PROXY_HOPS", 0),
            session_ttl_s=_float(env, "MP_SESSION_TTL_S", 7 * 86400.0),
            # The ceiling: a sign-in must finish within 10 minutes.
            oauth_state_ttl_s=min(_float(env, "MP_OAUTH_STATE_TTL_S", 600.0), 600.0),
            key_cache_ttl_s=_float(env, "MP_KEY_CACHE_TTL_S", 60.0),
            key_cache_size=_int(env, "MP_KEY_CACHE_SIZE", 100_000),
            key_last_used_flush_s=_float(env, "MP_KEY_LAST_USED_FLUSH_S", 5.0),
            db_pool_size=_int(env, "MP_DB_POOL_SIZE", 10),
            log_json=env.get("MP_LOG_FORMAT", "console") == "json",
            log_level=env.get("MP_LOG_LEVEL", "info"),
            quota_requests_per_day=_int(env, "MP_QUOTA_REQUESTS_PER_DAY", 10_000),
            quota_tokens_per_day=_int(env, "MP_QUOTA_TOKENS_PER_DAY", 5_000_000),
            quota_concurrent=_int(env, "MP_QUOTA_CONCURRENT", 16),
            demo_quota_requests_per_day=_int(env, "MP_DEMO_QUOTA_REQUESTS_PER_DAY", 20),
            demo_quota_tokens_per_day=_int(env, "MP_DEMO_QUOTA_TOKENS_PER_DAY", 20_000),
            demo_quota_concurrent=_int(env, "MP_DEMO_QUOTA_CONCURRENT", 1),
            metering=env.get("MP_METERING", "on") != "off",
            reservation_stale_s=_float(env, "MP_RESERVATION_STALE_S", 30.0),
            response_ttl_s=_float(env, "MP_RESPONSE_TTL_S", 86400.0),
            response_max_bytes=_int(env, "MP_RESPONSE_MAX_BYTES", 4 << 20),
            provisional_admissions_per_min=_int(env, "MP_PROVISIONAL_ADMISSIONS_PER_MIN", 10),
            admission_cache_ttl_s=_float(env, "MP_ADMISSION_CACHE_TTL_S", 30.0),
            provider_max_slots=_int(env, "MP_PROVIDER_MAX_SLOTS", 64),
            provider_violation_limit=_int(env, "MP_PROVIDER_VIOLATION_LIMIT", 3),
            provider_violation_window_s=_float(env, "MP_PROVIDER_VIOLATION_WINDOW_S", 3600.0),
            uncatalogued_models=_choice(env, "MP_UNCATALOGUED_MODELS", ("refuse", "allow")),
            canaries=_choice(env, "MP_CANARIES", ("on", "off")) == "on",
            canary_join_delay_s=_float(env, "MP_CANARY_JOIN_DELAY_S", 30.0),
            canary_interval_s=_float(env, "MP_CANARY_INTERVAL_S", 1800.0),
            canary_tokens=_bounded_int(env, "MP_CANARY_TOKENS", 24, 1, 256),
            nats_user=env.get("MP_NATS_USER", ""),
            nats_password=env.get("MP_NATS_PASSWORD", ""),
        )
