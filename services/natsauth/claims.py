"""The claims of the auth callout (nats-io/jwt v2 `authorization_claims.go`, `user_claims.go`).

The server sends an `authorization_request` signed by its own server nkey (`iss`,
"N..."): `sub` is the callout issuer (our account public key), `aud`
"nats-authorization-request", and under "nats" the server (`server_id.id` is its
public key, `xkey` its curve key when it seals requests), `user_nkey` (a one-off
"U..." key the server made for this connection attempt), the client's address and
its CONNECT options (`auth_token`, `user`, `pass`, ...).

We answer with an `authorization_response` signed by the issuer account: `sub` =
that `user_nkey`, `aud` = the server's id, and under "nats" either `jwt` (a user
JWT) or `error`. The user JWT's `sub` is the same `user_nkey`; outside operator
mode its `aud` names the account the connection is placed in, `name` becomes the
connection's user name (what `CONNZ` filters on), and `exp` ends the connection
when it passes (it reconnects and is checked again).
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.permissions import Permissions
from services.natsauth.jwt import VERSION

REQUEST_AUDIENCE = "nats-authorization-request"
REQUEST_TYPE = "authorization_request"
# nats-io/jwt's NoLimit: the user's own limits defer to the account's and the server's.
_NO_LIMIT = -1


class ServerId(msgspec.Struct, frozen=True):
    id: str
    name: str = ""
    host: str = ""
    xkey: str = ""


class ClientInfo(msgspec.Struct, frozen=True):
    host: str = ""
    id: int = 0
    kind: str = ""
    type: str = ""


class ConnectOptions(msgspec.Struct, frozen=True):
    auth_token: str = ""
    user: str = ""
    password: str = msgspec.field(default="", name="pass")
    name: str = ""


class AuthorizationRequest(msgspec.Struct, frozen=True):
    server_id: ServerId
    user_nkey: str
    client_info: ClientInfo = ClientInfo()
    connect_opts: ConnectOptions = ConnectOptions()
    type: str = ""
    version: int = 0


class RequestClaims(msgspec.Struct, frozen=True):
    iss: str
    sub: str
    nats: AuthorizationRequest
    aud: str = ""
    exp: int = 0
    iat: int = 0


def _permission(allow: tuple[str, ...]) -> dict[str, list[str]]:
    # An empty allow list would mean "no restriction" to the server: deny everything instead.
    return {"allow": list(allow)} if allow else {"deny": [">"]}


def user_claims(*, user_nkey: str, account: str, name: str, permissions: Permissions, expires: int) -> dict[str, Any]:
    """`expires`: Unix seconds, or 0 for a JWT that never expires."""
    return {
        "aud": account,
        "exp": expires,
        "name": name,
        "sub": user_nkey,
        "nats": {
            "pub": _permission(permissions.publish),
            "sub": _permission(permissions.subscribe),
            "subs": _NO_LIMIT,
            "data": _NO_LIMIT,
            "payload": _NO_LIMIT,
            "type": "user",
            "version": VERSION,
        },
    }


def response_claims(*, user_nkey: str, server_id: str, jwt: str = "", error: str = "") -> dict[str, Any]:
    answer = {"jwt": jwt} if jwt else {"error": error}
    return {
        "aud": server_id,
        "sub": user_nkey,
        "nats": {**answer, "type": "authorization_response", "version": VERSION},
    }
