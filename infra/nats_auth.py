"""NATS users for a nats-server we run: one for the control plane, one per provider.

Providers are other people's Macs, so NATS vouches for who is talking. A
provider's user may only receive its own work, cancels and drains (and the
pool-wide probe), and only publish its own heartbeats, leaves and replies under
its own reply prefix, which also proves to the gateway who sent each frame. No
`_INBOX.>` and no wildcard over other providers: a provider never sees anyone
else's work or replies. The control plane's user (shared by every gateway
replica and the admin CLI) sends work anywhere and reads heartbeats and replies.

Passwords are 256 random bits kept for the processes we start in
`<state_dir>/credentials.json` (0600); the server's config (`auth.conf`, 0600,
included from nats.conf) holds only their bcrypt hashes. Adding a user rewrites
`auth.conf` and reloads the server (SIGHUP); connected clients stay connected.

Every subject comes from `schemas.subjects`. A cloud deployment brings its own
NATS accounts; there `NATS_URL` / `MP_NATS_USER` / `MP_NATS_PASSWORD` are used as
given and nothing here runs.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from infra.nats import NatsServer
from schemas import subjects
from schemas.private_file import write_private

GATEWAY_USER = "gateway"
_CREDENTIALS_FILE = "credentials.json"
_AUTH_FILE = "auth.conf"
# The passwords are 256-bit random strings, so a slow hash buys nothing against
# guessing; the cost is paid by the server on every (re)connect, and a NATS
# restart reconnects every daemon at once.
_BCRYPT_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str = field(repr=False)

    def env(self) -> dict[str, str]:
        """How a gateway, daemon or the admin CLI is handed them (never in a logged URL)."""
        return {"MP_NATS_USER": self.user, "MP_NATS_PASSWORD": self.password}

    def in_url(self, url: str) -> str:
        """`url` with these credentials as its user info (for tests and tools that take one URL)."""
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        netloc = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}@{host}"
        return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True, slots=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def gateway_permissions() -> Permissions:
    return Permissions(
        publish=(subjects.ALL_WORK, subjects.ALL_CANCELS, subjects.ALL_DRAINS, subjects.PROBE),
        subscribe=(subjects.HEARTBEATS, subjects.LEAVES, subjects.ALL_REPLIES),
    )


def provider_permissions(provider_id: str) -> Permissions:
    return Permissions(
        publish=(
            subjects.heartbeat(provider_id),
            subjects.leave(provider_id),
            subjects.provider_replies(provider_id),
        ),
        subscribe=(
            subjects.work(provider_id),
            subjects.cancel(provider_id),
            subjects.drain(provider_id),
            subjects.PROBE,
        ),
    )


def provider_user(provider_id: str) -> str:
    subjects.heartbeat(provider_id)  # validates the id: it becomes a subject token and a user name
    return f"provider-{provider_id}"


def split_credentials(url: str) -> tuple[str, Credentials | None]:
    """(the URL without user info, the credentials it carried if any)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), Credentials(unquote(user), unquote(password))


def _conf(value: str) -> str:
    # JSON strings are valid NATS config strings; quoting keeps `$` in bcrypt hashes literal.
    return json.dumps(value)


def _conf_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_conf(v) for v in values) + "]"


def render_authorization(users: Iterable[tuple[str, str, Permissions]]) -> str:
    """The nats-server `authorization` block for (user, bcrypt hash, permissions) triples."""
    lines = ["authorization {", "  users = ["]
    for name, password_hash, perms in users:
        lines.append(
            f"    {{user: {_conf(name)}, password: {_conf(password_hash)}, permissions: {{"
            f"publish: {{allow: {_conf_list(perms.publish)}}}, "
            f"subscribe: {{allow: {_conf_list(perms.subscribe)}}}}}}}"
        )
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def _hash(password: str) -> str:
    import bcrypt  # only the local stack and the tests write NATS configs

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(_BCRYPT_ROUNDS)).decode()


class NatsUsers:
    """The users of one nats-server: passwords for us, hashes for the server, both under `state_dir`."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._path = state_dir / _CREDENTIALS_FILE
        self._users: dict[str, dict[str, object]] = {}
        if self._path.exists():
            self._users = json.loads(self._path.read_text())

    @property
    def config_extra(self) -> str:
        return f"include {_conf(_AUTH_FILE)}"

    def ensure(self, name: str, permissions: Permissions) -> tuple[Credentials, bool]:
        """The user's credentials, made (or its permissions updated) if needed; True if anything changed."""
        entry = self._users.get(name)
        publish, subscribe = list(permissions.publish), list(permissions.subscribe)
        if entry is not None and entry["publish"] == publish and entry["subscribe"] == subscribe:
            return Credentials(name, str(entry["password"])), False
        if entry is None:
            password = secrets.token_urlsafe(32)
            entry = {"password": password, "hash": _hash(password)}
        self._users[name] = {**entry, "publish": publish, "subscribe": subscribe}
        return Credentials(name, str(entry["password"])), True

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_private(self._path, json.dumps(self._users, indent=1, sort_keys=True))
        write_private(
            self.state_dir / _AUTH_FILE,
            render_authorization(
                (
                    name,
                    str(entry["hash"]),
                    Permissions(tuple(entry["publish"]), tuple(entry["subscribe"])),  # type: ignore[arg-type]
                )
                for name, entry in sorted(self._users.items())
            ),
        )


class SecuredNats:
    """A nats-server with authorization on, which can add users (e.g. a new provider) while it runs."""

    def __init__(self, server: NatsServer, users: NatsUsers, gateway: Credentials) -> None:
        self.server = server
        self.users = users
        self.gateway = gateway
        self._lock = threading.Lock()

    @classmethod
    def start(cls, state_dir: Path, *, port: int | None = None) -> SecuredNats:
        state_dir.mkdir(parents=True, exist_ok=True)
        users = NatsUsers(state_dir.resolve())
        gateway, _ = users.ensure(GATEWAY_USER, gateway_permissions())
        users.save()
        server = NatsServer.start(state_dir, port=port, config_extra=users.config_extra)
        return cls(server, users, gateway)

    @property
    def url(self) -> str:
        """The server's URL without credentials (what processes get as NATS_URL)."""
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def gateway_url(self) -> str:
        """The URL with the control plane's credentials in it, for tools and tests that take one URL."""
        return self.gateway.in_url(self.server.url)

    def add_user(self, name: str, permissions: Permissions) -> Credentials:
        with self._lock:
            credentials, changed = self.users.ensure(name, permissions)
            if changed:
                self.users.save()
                self.server.reload()
            return credentials

    def provider(self, provider_id: str) -> Credentials:
        """Credentials for one provider, registered with the running server on first use."""
        return self.add_user(provider_user(provider_id), provider_permissions(provider_id))

    def restart(self, *, down_s: float = 0.0) -> None:
        """Stop the server and start it again on the same port, users and config (clients reconnect)."""
        self.server.stop()
        time.sleep(down_s)
        self.server = NatsServer.start(
            self.server.state_dir, port=self.server.port, config_extra=self.users.config_extra
        )

    def stop(self) -> None:
        self.server.stop()


# What start_gateway()/start_daemon() are given: a server we launched (it can make a new
# provider's user on the spot) or the URL of one run elsewhere (credentials are the caller's).
NatsTarget: TypeAlias = "SecuredNats | str"


def child_env(
    nats: NatsTarget, *, provider_id: str | None = None, credentials: Credentials | None = None
) -> dict[str, str]:
    """NATS_URL and credentials for a gateway (no provider id) or a daemon we start.

    Explicit credentials win; else, on a server we launched, the control plane's or
    the provider's own (made now if new), and never credentials embedded in a URL;
    else the URL is used as given (an external NATS: its credentials are the caller's).
    """
    if isinstance(nats, SecuredNats):
        url = nats.url
        if credentials is None:
            credentials = nats.gateway if provider_id is None else nats.provider(provider_id)
    else:
        url = nats
    if credentials is None:
        return {"NATS_URL": url}
    return {"NATS_URL": split_credentials(url)[0], **credentials.env()}


def control_url(nats: NatsTarget) -> str:
    """A URL to connect as the control plane: with its credentials on a server we launched."""
    return nats.gateway_url if isinstance(nats, SecuredNats) else nats
