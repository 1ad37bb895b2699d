"""Control-plane settings, read once from the environment into a frozen object."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from schemas import env as env_vars
from schemas.device import MAX_EXPIRES_IN_S, MAX_INTERVAL_S
from schemas.env import EnvError
from schemas.private_file import write_private
from schemas.redact import REDACTED, redact_url
from schemas.tracing import TracingConfig, TracingSettingsError, config_from_env

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/macprovider"


# A variable that does not parse names itself (schemas/env.py); so does every other refusal here.
SettingsError = EnvError
_float = env_vars.positive
_non_negative = env_vars.non_negative
_int = env_vars.integer


def _positive_int(env: Mapping[str, str], key: str, default: int) -> int:
    value = _int(env, key, default)
    if value < 1:
        raise SettingsError(f"{key} must be at least 1, got {value}")
    return value


def _bounded_int(env: Mapping[str, str], key: str, default: int, *, low: int, high: int) -> int:
    value = _int(env, key, default)
    if not low <= value <= high:
        raise SettingsError(f"{key} must be between {low} and {high}, got {value}")
    return value


def without_credentials(url: str) -> str:
    """A (comma-separated list of) URL(s) with no user, password, token or query: safe to hand out."""
    out = []
    for part in url.split(","):
        parts = urlsplit(part.strip())
        host = parts.netloc.rpartition("@")[2]
        out.append(urlunsplit((parts.scheme, host, parts.path, "", "")))
    return ",".join(out)


def _public_nats_url(env: Mapping[str, str]) -> str:
    raw = env.get("MP_PUBLIC_NATS_URL") or without_credentials(env.get("NATS_URL", DEFAULT_NATS_URL))
    if without_credentials(raw) != raw:
        # Every Mac that signs in receives it: it must not carry anyone's credentials.
        raise SettingsError("MP_PUBLIC_NATS_URL must not hold a user, password, token or query")
    return raw


_SECRET_FILE = "secret_key"
_METRICS_TOKEN_FILE = "metrics_token"


def _generated(home: Path, name: str) -> str:
    """A secret `ensure_local_secrets` generated under MP_HOME ("" when there is none)."""
    path = home / name
    return path.read_text().strip() if path.is_file() else ""


def _secret_key(env: Mapping[str, str], home: Path) -> bytes:
    """MP_SECRET_KEY, or the one generated under MP_HOME (the local stack and its replicas share it)."""
    raw = env.get("MP_SECRET_KEY", "")
    if raw:
        if len(raw) < 32:
            raise SettingsError("MP_SECRET_KEY must be at least 32 characters")
        return raw.encode()
    return _generated(home, _SECRET_FILE).encode()


def _metrics_token(env: Mapping[str, str], home: Path) -> str:
    """MP_METRICS_TOKEN, or the one generated under MP_HOME (where `mac-provider up`'s scraper reads it)."""
    raw = env.get("MP_METRICS_TOKEN", "").strip()
    if raw:
        if len(raw) < 32 or not raw.isascii() or not raw.isprintable() or " " in raw:
            raise SettingsError("MP_METRICS_TOKEN must be 32+ visible ASCII characters")
        return raw
    return _generated(home, _METRICS_TOKEN_FILE)


def ensure_local_secrets(env: Mapping[str, str] | None = None) -> None:
    """Generate, once, the secret key and the metrics token under MP_HOME that the environment does not set.

    Only serving does this (`mac-provider serve`): reading settings writes nothing, so an admin
    command or a test never leaves a secret behind in whatever folder it ran from.
    """
    env = os.environ if env is None else env
    home = _home(env)
    for variable, name, size in (("MP_SECRET_KEY", _SECRET_FILE, 48), ("MP_METRICS_TOKEN", _METRICS_TOKEN_FILE, 32)):
        path = home / name
        if env.get(variable, "").strip() or path.exists():
            continue
        home.mkdir(parents=True, exist_ok=True)
        # Not replacing: if another replica made the file first, everyone uses that one.
        with contextlib.suppress(FileExistsError):
            write_private(path, secrets.token_urlsafe(size), replace=False)


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("MP_HOME", ".mp")).expanduser().resolve()


def _tracing(env: Mapping[str, str]) -> TracingConfig:
    try:
        return config_from_env(env)
    except TracingSettingsError as exc:
        raise SettingsError(str(exc)) from None


def _seed(env: Mapping[str, str], key: str, *, account: bool) -> str:
    """An nkey seed (account or curve), checked now so a typo fails at start (never quoted back)."""
    from services.natsauth import keys

    raw = env.get(key, "").strip()
    if raw:
        try:
            keys.decode_seed(raw, keys.PREFIX_ACCOUNT if account else keys.PREFIX_CURVE)
        except keys.NkeyError:
            kind = "an account nkey seed (SA...)" if account else "a curve nkey seed (SX...)"
            raise SettingsError(f"{key} is not {kind}") from None
    return raw


def _nats_name(env: Mapping[str, str], key: str, default: str) -> str:
    value = env.get(key) or default
    if not value.isascii() or not value.replace("_", "").replace("-", "").isalnum() or len(value) > 64:
        raise SettingsError(f"{key} must be a NATS account name (A-Z a-z 0-9 _ -), got {value!r}")
    return value


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
    # How long an idle HTTP connection is kept: longer than what a load balancer or client in front
    # keeps one (Caddy here and nginx 60 s, httpx 5 s), so the server is never the one closing a
    # connection just as the other side sends a request on it (a failed POST that nobody retries).
    http_keepalive_s: int
    database_url: str = field(metadata=URL)
    nats_url: str = field(metadata=URL)
    # Identifies this replica on the bus; replies for its requests come to its own subject.
    gateway_id: str
    # Whole-request ceiling enforced by the gateway (seed 000: deployment-configured).
    request_timeout_s: float
    # How long an inference request's body may take to arrive once its headers have (a client that
    # trickles it, or never sends it, holds a connection and a task until then: 408).
    body_timeout_s: int
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
    # A non-stream answer's tokens come in one frame per this many ms (bus.InferenceRequest.frame_ms).
    nonstream_frame_ms: int
    # While a request runs on a provider, this replica tells it every this many ms that it is still there
    # (bus.InferenceRequest.keepalive_ms): a provider stops a dead replica's requests 3 of these after its
    # last word. 0: never (the provider then generates on to the request's end).
    gateway_keepalive_ms: int
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
    # Signs demo tokens; every replica must share it (generated under MP_HOME by `serve` when unset;
    # empty when neither: the gateway then refuses to start).
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
    # Apply pending migrations when a process starts (the local stack); off where a migration Job
    # does it (Kubernetes, infra/deploy), so the services' database role needs no DDL rights.
    migrate_on_start: bool
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
    # Where usage events go: "jetstream" (a durable stream, written to the ledger in batches off the
    # request path) or "postgres" (each request's reservation and settlement straight to Postgres).
    settlement: str
    # Copies of the usage stream JetStream keeps (3 in a 3-node cluster; 1 on one server).
    usage_stream_replicas: int
    # How long the ledger consumer waits for more events before writing a batch.
    ledger_linger_ms: int
    # What the usage stream may hold while Postgres cannot be written (then requests get 503).
    usage_stream_max_mb: int
    # After SIGTERM: readiness fails at once, but requests are still taken for this long, while
    # load balancers stop sending (Kubernetes removes a terminating pod from its endpoints late).
    shutdown_delay_s: float
    # Then new requests are refused (503) and running ones get this long to finish; past it,
    # streams still running end with an in-band error, are settled, and the process exits.
    shutdown_grace_s: float
    # A replica that routes is ready once it has listened for heartbeats this long since it
    # (re)connected to NATS: one heartbeat interval of the daemons (their MP_HEARTBEAT_S).
    pool_warmup_s: float
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
    # The control plane's NATS user (the local stack makes one); empty: NATS_URL alone. With the
    # auth callout below, it is also the one credential besides provider tokens that it lets in.
    nats_user: str
    nats_password: str = field(metadata=SECRET)
    # The NATS auth callout (services/natsauth/; off while the seed is empty): the account nkey seed
    # that signs user JWTs (the server's `auth_callout.issuer` is its public key), and the curve
    # seed that opens sealed requests (`auth_callout.xkey`; empty: the server sends them in clear).
    nats_issuer_seed: str = field(metadata=SECRET)
    nats_xkey_seed: str = field(metadata=SECRET)
    # The callout service's own login (one of `auth_callout.auth_users`, in its `account`).
    nats_auth_user: str
    nats_auth_password: str = field(metadata=SECRET)
    # A login in the server's system account, to find and close a banned provider's connections
    # (CONNZ / KICK); empty: revocations and bans act when the user JWT expires.
    nats_sys_user: str
    nats_sys_password: str = field(metadata=SECRET)
    # The account the callout puts the control plane and providers in (the audience of user JWTs).
    nats_account: str
    # How long a provider's user JWT lets its connection live (0: no expiry). The server then closes
    # it with "User Authentication Expired", which nats-py takes as final: it never reconnects
    # (nats-io/nats.py#1019). So it is off by default, and the re-check below bounds instead how long
    # a provider that lost its access (a notice missed) stays connected, without disconnecting the rest.
    nats_user_ttl_s: float
    # How often the callout checks every provider connection against Postgres and closes those
    # that may not connect any more (revocations and bans close them at once anyway).
    nats_recheck_s: float
    # Device login (RFC 8628): how long a code lives, and the least seconds between two polls.
    device_code_ttl_s: int = 600
    device_poll_interval_s: int = 5
    # Per-client budgets in each replica's memory: device codes asked for, and wrong user codes
    # typed on /device (also counted per account).
    device_codes_per_min: int = 10
    device_wrong_codes_per_min: int = 10
    # The NATS URL handed to a Mac that signs in (never with the control plane's own credentials).
    public_nats_url: str = field(default="", metadata=URL)
    # What a Prometheus scraper sends to read /metrics (`Authorization: Bearer ...`); every replica
    # should share it (generated under MP_HOME by `serve` when unset; empty: /metrics refuses everyone).
    metrics_token: str = field(default="", metadata=SECRET)
    # OpenTelemetry traces (schemas/tracing.py): MP_OTEL_EXPORTER and friends; off by default.
    tracing: TracingConfig = field(default_factory=TracingConfig)
    # Who an operator's catalog change is recorded as when `--by` is not given (`mac-provider admin models`).
    operator: str = ""

    def __repr__(self) -> str:
        return f"Settings({_safe_fields(self)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = _home(env)
        gateway_id = env.get("MP_GATEWAY_ID") or f"gw-{secrets.token_hex(4)}"
        port = _int(env, "MP_PORT", 8080)
        public_url = (env.get("MP_PUBLIC_URL") or f"http://127.0.0.1:{port}").rstrip("/")
        return cls(
            home=home,
            host=env.get("MP_HOST", "127.0.0.1"),
            port=port,
            http_keepalive_s=_bounded_int(env, "MP_HTTP_KEEPALIVE_S", 75, low=1, high=3600),
            database_url=env.get("DATABASE_URL", DEFAULT_DATABASE_URL),
            nats_url=env.get("NATS_URL", DEFAULT_NATS_URL),
            gateway_id=gateway_id,
            request_timeout_s=_float(env, "MP_REQUEST_TIMEOUT_S", 600.0),
            body_timeout_s=_bounded_int(env, "MP_BODY_TIMEOUT_S", 30, low=1, high=600),
            accept_timeout_s=_float(env, "MP_ACCEPT_TIMEOUT_S", 2.0),
            stream_idle_timeout_s=_float(env, "MP_STREAM_IDLE_TIMEOUT_S", 120.0),
            first_token_timeout_s=_float(env, "MP_FIRST_TOKEN_TIMEOUT_S", 60.0),
            max_failovers=_int(env, "MP_MAX_FAILOVERS", 2),
            lost_after_intervals=_float(env, "MP_LOST_AFTER_INTERVALS", 2.0),
            routing=_choice(env, "MP_ROUTING", ("least-loaded", "random")),
            default_max_tokens=_int(env, "MP_DEFAULT_MAX_TOKENS", 1024),
            nonstream_frame_ms=_bounded_int(env, "MP_NONSTREAM_FRAME_MS", 50, low=0, high=1000),
            gateway_keepalive_ms=_bounded_int(env, "MP_GATEWAY_KEEPALIVE_MS", 2000, low=0, high=60_000),
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
            migrate_on_start=_choice(env, "MP_MIGRATE_ON_START", ("on", "off")) == "on",
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
            settlement=_choice(env, "MP_SETTLEMENT", ("jetstream", "postgres")),
            usage_stream_replicas=_bounded_int(env, "MP_USAGE_STREAM_REPLICAS", 1, low=1, high=5),
            ledger_linger_ms=_bounded_int(env, "MP_LEDGER_LINGER_MS", 100, low=0, high=200),
            usage_stream_max_mb=_bounded_int(env, "MP_USAGE_STREAM_MAX_MB", 256, low=16, high=1 << 20),
            shutdown_delay_s=_non_negative(env, "MP_SHUTDOWN_DELAY_S", 0.0),
            shutdown_grace_s=_non_negative(env, "MP_SHUTDOWN_GRACE_S", 10.0),
            pool_warmup_s=_non_negative(env, "MP_POOL_WARMUP_S", 1.0),
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
            canary_tokens=_bounded_int(env, "MP_CANARY_TOKENS", 24, low=1, high=256),
            nats_user=env.get("MP_NATS_USER", ""),
            nats_password=env.get("MP_NATS_PASSWORD", ""),
            nats_issuer_seed=_seed(env, "MP_NATS_ISSUER_SEED", account=True),
            nats_xkey_seed=_seed(env, "MP_NATS_XKEY_SEED", account=False),
            nats_auth_user=env.get("MP_NATS_AUTH_USER", ""),
            nats_auth_password=env.get("MP_NATS_AUTH_PASSWORD", ""),
            nats_sys_user=env.get("MP_NATS_SYS_USER", ""),
            nats_sys_password=env.get("MP_NATS_SYS_PASSWORD", ""),
            nats_account=_nats_name(env, "MP_NATS_ACCOUNT", "APP"),
            nats_user_ttl_s=_non_negative(env, "MP_NATS_USER_TTL_S", 0.0),
            nats_recheck_s=_float(env, "MP_NATS_RECHECK_S", 60.0),
            device_code_ttl_s=_bounded_int(env, "MP_DEVICE_CODE_TTL_S", 600, low=1, high=MAX_EXPIRES_IN_S),
            device_poll_interval_s=_bounded_int(env, "MP_DEVICE_POLL_INTERVAL_S", 5, low=1, high=MAX_INTERVAL_S),
            device_codes_per_min=_positive_int(env, "MP_DEVICE_CODES_PER_MIN", 10),
            device_wrong_codes_per_min=_positive_int(env, "MP_DEVICE_WRONG_CODES_PER_MIN", 10),
            public_nats_url=_public_nats_url(env),
            metrics_token=_metrics_token(env, home),
            tracing=_tracing(env),
            operator=env.get("MP_OPERATOR", "").strip()[:256],
        )
