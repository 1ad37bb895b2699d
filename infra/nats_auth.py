"""Authorization of a nats-server we run: the NATS auth callout, and no provider user in its config.

The config (`auth.conf`, 0600, included from nats.conf) has three accounts:
`AUTH`, where the callout service logs in (services/natsauth/, run by every
control plane, or alone as `mac-provider serve --service natsauth`); `APP`, where
the callout places the control plane and each provider with exactly their
subjects (schemas/permissions.py); and `SYS`, the system account, whose login
lets the callout service find and close a banned provider's connections. Every
other connection attempt is a request to the callout: a provider presents its
token (`mpp_`, minted in Postgres), the control plane its user and password.
Adding a provider changes nothing here.

The secrets (the issuer's account seed, the xkey seed, the passwords) are kept
for the processes we start in `<state_dir>/credentials.json` (0600), with the
provider tokens minted for daemons we start; the config holds public keys and
bcrypt hashes only. `tool_users` are logins a test or tool asks for at start
(e.g. one that publishes anyone's heartbeats, to stand for many Macs): listed in
`auth_users`, so the callout never sees them.

A cloud deployment brings its own NATS: `NATS_URL` and the MP_NATS_* settings are
used as given and nothing here runs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from infra.nats import NatsServer
from schemas.permissions import Permissions
from schemas.private_file import read_private, write_private
from services.natsauth import keys, server_config

GATEWAY_USER = "gateway"
# The callout service's login (in AUTH_ACCOUNT) and the system account's.
CALLOUT_USER = "natsauth"
SYSTEM_USER = "system"
APP_ACCOUNT = server_config.APP_ACCOUNT
_CREDENTIALS_FILE = "credentials.json"
_AUTH_FILE = "auth.conf"
# The passwords are 256-bit random strings, so a slow hash buys nothing against
# guessing; the cost is paid by the server on every (re)connect of these few logins.
_BCRYPT_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str = field(repr=False)

    def env(self) -> dict[str, str]:
        """How a gateway or the admin CLI is handed them (never in a logged URL)."""
        return {"MP_NATS_USER": self.user, "MP_NATS_PASSWORD": self.password}

    def in_url(self, url: str) -> str:
        """`url` with these credentials as its user info (for tests and tools that take one URL)."""
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        netloc = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}@{host}"
        return urlunsplit(parts._replace(netloc=netloc))


def split_credentials(url: str) -> tuple[str, Credentials | None]:
    """(the URL without user info, the credentials it carried if any)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), Credentials(unquote(user), unquote(password))


def _password() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class BusSecrets:
    """What `credentials.json` keeps: every secret of one local bus (never in its config)."""

    issuer_seed: str = field(repr=False)
    xkey_seed: str = field(repr=False)
    passwords: dict[str, str] = field(repr=False)  # login -> password: gateway, callout, system, tools
    tool_permissions: dict[str, Permissions] = field(default_factory=dict)
    provider_tokens: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def new(cls) -> BusSecrets:
        return cls(
            keys.new_account_seed(),
            keys.new_curve_seed(),
            {name: _password() for name in (GATEWAY_USER, CALLOUT_USER, SYSTEM_USER)},
        )

    @classmethod
    def load(cls, path: Path) -> BusSecrets | None:
        if not path.exists():
            return None
        raw = json.loads(read_private(path, max_bytes=1 << 20, what="the NATS credentials"))
        if "issuer_seed" not in raw:
            return None  # written by the per-user scheme before the callout: start afresh
        return cls(
            raw["issuer_seed"],
            raw["xkey_seed"],
            dict(raw["passwords"]),
            {n: Permissions(tuple(p["publish"]), tuple(p["subscribe"])) for n, p in raw.get("tools", {}).items()},
            dict(raw.get("provider_tokens", {})),
        )

    def save(self, path: Path) -> None:
        body: dict[str, Any] = {
            "issuer_seed": self.issuer_seed,
            "xkey_seed": self.xkey_seed,
            "passwords": self.passwords,
            "tools": {
                n: {"publish": list(p.publish), "subscribe": list(p.subscribe)}
                for n, p in self.tool_permissions.items()
            },
            "provider_tokens": self.provider_tokens,
        }
        write_private(path, json.dumps(body, indent=1, sort_keys=True))

    def credentials(self, user: str) -> Credentials:
        return Credentials(user, self.passwords[user])

    def callout_env(self) -> dict[str, str]:
        """What a control plane needs to run the callout service against this bus."""
        return {
            "MP_NATS_ISSUER_SEED": self.issuer_seed,
            "MP_NATS_XKEY_SEED": self.xkey_seed,
            "MP_NATS_AUTH_USER": CALLOUT_USER,
            "MP_NATS_AUTH_PASSWORD": self.passwords[CALLOUT_USER],
            "MP_NATS_SYS_USER": SYSTEM_USER,
            "MP_NATS_SYS_PASSWORD": self.passwords[SYSTEM_USER],
            "MP_NATS_ACCOUNT": APP_ACCOUNT,
        }


def _hash(password: str) -> str:
    import bcrypt  # only the local stack and the tests write NATS configs

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(_BCRYPT_ROUNDS)).decode()


def render_authorization(bus: BusSecrets) -> str:
    """The accounts and `authorization { auth_callout }` blocks for a bus (public keys and hashes only)."""

    def login(name: str, permissions: Permissions | None = None) -> server_config.Login:
        return server_config.Login(name, _hash(bus.passwords[name]), permissions)

    return server_config.render(
        issuer_public=keys.account_public_key(bus.issuer_seed),
        xkey_public=keys.curve_public_key(bus.xkey_seed),
        callout=login(CALLOUT_USER),
        system=login(SYSTEM_USER),
        app_users=[login(name, bus.tool_permissions[name]) for name in sorted(bus.tool_permissions)],
    )


def write_config(state_dir: Path, bus: BusSecrets) -> str:
    """Write `auth.conf` (0600) for this bus; the line that includes it from nats.conf."""
    write_private(state_dir / _AUTH_FILE, render_authorization(bus))
    return f"include {json.dumps(_AUTH_FILE)}"


def _run(coro_fn: Any) -> Any:
    """Run a coroutine to completion from sync code, also when called inside a running event loop."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro_fn()))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="mint-provider-token")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class SecuredNats:
    """A nats-server with the auth callout on; provider tokens for daemons we start are minted in Postgres."""

    def __init__(self, server: NatsServer, bus: BusSecrets, state_dir: Path, database_url: str | None) -> None:
        self.server = server
        self.bus = bus
        self.state_dir = state_dir
        self.database_url = database_url
        self._lock = threading.Lock()
        self._checked: set[str] = set()

    @classmethod
    def start(
        cls,
        state_dir: Path,
        *,
        port: int | None = None,
        database_url: str | None = None,
        tool_users: Mapping[str, Permissions] | None = None,
        extra_config: str = "",
    ) -> SecuredNats:
        """Start the server on `state_dir` (its secrets kept there, or made there the first time).

        `extra_config` is added to the config as is (e.g. a `cluster` block: nodes that share
        one `credentials.json` make one bus).
        """
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir = state_dir.resolve()
        path = state_dir / _CREDENTIALS_FILE
        bus = BusSecrets.load(path) or BusSecrets.new()
        for name, permissions in (tool_users or {}).items():
            if name in (GATEWAY_USER, CALLOUT_USER, SYSTEM_USER):
                raise ValueError(f"{name!r} is one of the bus's own logins")
            bus.passwords.setdefault(name, _password())
            bus.tool_permissions[name] = permissions
        bus.save(path)
        config = write_config(state_dir, bus) + ("\n" + extra_config if extra_config else "")
        server = NatsServer.start(state_dir, port=port, config_extra=config)
        return cls(server, bus, state_dir, database_url)

    @property
    def url(self) -> str:
        """The server's URL without credentials (what processes get as NATS_URL)."""
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def gateway(self) -> Credentials:
        """The control plane's login (checked by the callout, in no config)."""
        return self.bus.credentials(GATEWAY_USER)

    @property
    def gateway_url(self) -> str:
        """The URL with the control plane's credentials in it, for tools and tests that take one URL."""
        return self.gateway.in_url(self.server.url)

    def tool(self, name: str) -> Credentials:
        """A login asked for in `tool_users` at start."""
        return self.bus.credentials(name)

    def control_plane_env(self) -> dict[str, str]:
        """NATS_URL and everything a control plane needs here: its login and the callout's settings."""
        return {"NATS_URL": self.url, **self.gateway.env(), **self.bus.callout_env()}

    def provider_token(self, provider_id: str) -> str:
        """A live `mpp_` token for this provider id: minted in Postgres on first use, then kept."""
        if self.database_url is None:
            raise RuntimeError("this bus was started without a database_url: it cannot mint provider tokens")
        database_url = self.database_url
        with self._lock:
            token = self.bus.provider_tokens.get(provider_id)
            if token is not None and provider_id in self._checked:
                return token

            async def ensure() -> str:
                import asyncpg

                from services.db.migrate import migrate
                from services.providers import tokens

                conn = await asyncpg.connect(database_url)
                try:
                    if token is not None and await tokens.owner_of(conn, token) is not None:
                        return token
                    await migrate(conn)
                    return await tokens.mint(conn, provider_id, name=provider_id[:64])
                finally:
                    await conn.close()

            fresh: str = _run(ensure)
            self.bus.provider_tokens[provider_id] = fresh
            self._checked.add(provider_id)
            self.bus.save(self.state_dir / _CREDENTIALS_FILE)
            return fresh

    def restart(self, *, down_s: float = 0.0) -> None:
        """Stop the server and start it again on the same port and config (clients reconnect)."""
        self.server.stop()
        time.sleep(down_s)
        self.server = NatsServer.start(self.state_dir, port=self.server.port, config_extra=self.server.config_extra)

    def stop(self) -> None:
        self.server.stop()


# What start_gateway()/start_daemon() are given: a server we launched (it mints a new
# provider's token on the spot) or the URL of one run elsewhere (credentials are the caller's).
NatsTarget: TypeAlias = "SecuredNats | str"


def child_env(
    nats: NatsTarget, *, provider_id: str | None = None, credentials: Credentials | None = None
) -> dict[str, str]:
    """NATS_URL and credentials for a control plane (no provider id) or a daemon we start.

    Explicit credentials win; else, on a server we launched, the control plane's login and
    callout settings, or the provider's own token (minted now if new), and never credentials
    embedded in a URL; else the URL is used as given (an external NATS: its credentials are
    the caller's).
    """
    if isinstance(nats, SecuredNats):
        if credentials is not None:
            return {"NATS_URL": nats.url, **credentials.env()}
        if provider_id is None:
            return nats.control_plane_env()
        return {"NATS_URL": nats.url, "MP_PROVIDER_TOKEN": nats.provider_token(provider_id)}
    if credentials is None:
        return {"NATS_URL": nats}
    return {"NATS_URL": split_credentials(nats)[0], **credentials.env()}


def control_url(nats: NatsTarget) -> str:
    """A URL to connect as the control plane: with its credentials on a server we launched."""
    return nats.gateway_url if isinstance(nats, SecuredNats) else nats
