"""The nats-server side of the callout: its accounts and `authorization { auth_callout }` block.

Written by the local stack (infra/nats_auth.py) and printed for a cloud deployment's
servers (`mac-provider admin nats-callout`), from public keys and bcrypt hashes only.
Every node of a cluster gets the same block; adding or changing it needs a server
restart, not a reload.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from schemas.permissions import Permissions

AUTH_ACCOUNT = "AUTH"
APP_ACCOUNT = "APP"
SYS_ACCOUNT = "SYS"
# Seconds the server waits for the callout's answer (its default is 2).
AUTH_TIMEOUT_S = 2


@dataclass(frozen=True, slots=True)
class Login:
    """A login the server itself knows (the callout never sees it): name, bcrypt hash, permissions."""

    name: str
    password_hash: str
    permissions: Permissions | None = None


def _conf(value: str) -> str:
    # JSON strings are valid NATS config strings; quoting keeps `$` in bcrypt hashes literal.
    return json.dumps(value)


def _conf_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_conf(v) for v in values) + "]"


def _allow(subjects: tuple[str, ...]) -> str:
    # An empty allow list would let everything through: deny everything instead.
    return f"{{allow: {_conf_list(subjects)}}}" if subjects else '{deny: [">"]}'


def _user(login: Login) -> str:
    perms = ""
    if login.permissions is not None:
        p = login.permissions
        perms = f", permissions: {{publish: {_allow(p.publish)}, subscribe: {_allow(p.subscribe)}}}"
    return f"{{user: {_conf(login.name)}, password: {_conf(login.password_hash)}{perms}}}"


def render(
    *,
    issuer_public: str,
    xkey_public: str,
    callout: Login,
    system: Login,
    app_users: Sequence[Login] = (),
    app_account: str = APP_ACCOUNT,
) -> str:
    """`app_users`: logins placed straight in the application account (tools), never called out."""
    app = ", ".join(_user(u) for u in app_users)
    return "\n".join(
        [
            "accounts {",
            f"  {AUTH_ACCOUNT} {{ users: [{_user(callout)}] }}",
            # JetStream (the usage-event stream) for the users the callout places here; the other
            # accounts get none. What each user may do with it is its permissions' business.
            f"  {app_account} {{ jetstream: enabled, users: [{app}] }}",
            f"  {SYS_ACCOUNT} {{ users: [{_user(system)}] }}",
            "}",
            f"system_account: {SYS_ACCOUNT}",
            "authorization {",
            f"  timeout: {AUTH_TIMEOUT_S}",
            "  auth_callout {",
            f"    issuer: {_conf(issuer_public)}",
            f"    xkey: {_conf(xkey_public)}",
            f"    account: {AUTH_ACCOUNT}",
            f"    auth_users: {_conf_list([callout.name, system.name, *(u.name for u in app_users)])}",
            "  }",
            "}",
            "",
        ]
    )
