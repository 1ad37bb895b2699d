"""NATS JWTs (nats-io/jwt v2) encoded and decoded: a few lines, so no JWT library.

A token is base64url (no padding) of a header `{"typ":"JWT","alg":"ed25519-nkey"}`,
a dot, base64url of the claims JSON, a dot, and base64url of the Ed25519
signature of the first two parts by the issuer's nkey. Its `jti` is, by nats'
convention, base32 (no padding) of SHA-512/256 over the JSON of the standard
claims (aud, exp, iat, iss, name, nbf, sub, in that order, empty ones left out)
taken with `jti` empty: a repeatable id of the token.

Decoding is for what the nats-server sends us; its bytes are still bounded and
checked before anything is believed, since a client's CONNECT fills most of them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from typing import Any, TypeVar

import msgspec

from services.natsauth.keys import SigningKey, verify

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_HEADER_B64 = base64.urlsafe_b64encode(json.dumps(HEADER, separators=(",", ":")).encode()).rstrip(b"=")
# The standard claims in the order nats-io/jwt's ClaimsData marshals them (the jti hash depends on it).
_STANDARD = ("aud", "exp", "jti", "iat", "iss", "name", "nbf", "sub")
# The version of the claims format ("nats": {"version": 2}).
VERSION = 2
T = TypeVar("T")


class JwtError(ValueError):
    """A token that is malformed, too large, unsigned by its issuer, or expired."""


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(part: bytes) -> bytes:
    try:
        # validate: refuse what is not base64url rather than skip over it.
        return base64.b64decode(part + b"=" * (-len(part) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise JwtError("not base64url") from None


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def jti(claims: dict[str, Any]) -> str:
    standard = {k: claims[k] for k in _STANDARD if k != "jti" and claims.get(k)}
    digest = hashlib.new("sha512_256", _dumps(standard)).digest()
    return base64.b32encode(digest).decode().rstrip("=")


def encode(claims: dict[str, Any], key: SigningKey, *, now: float | None = None) -> str:
    """Sign `claims` (aud, sub, exp, name and "nats" as the caller sets them); `key` becomes `iss`."""
    body = {k: v for k, v in claims.items() if k not in ("iss", "iat", "jti")}
    body["iss"] = key.public
    body["iat"] = int(time.time() if now is None else now)
    body["jti"] = jti(body)
    ordered = {k: body[k] for k in _STANDARD if body.get(k)}
    ordered.update({k: v for k, v in body.items() if k not in _STANDARD})
    signing_input = _HEADER_B64 + b"." + _b64(_dumps(ordered))
    return (signing_input + b"." + _b64(key.sign(signing_input))).decode()


def decode(token: bytes, kind: type[T], *, issuer_prefix: int, max_bytes: int, now: float | None = None) -> T:
    """The claims of a token signed by its own `iss` (an nkey of `issuer_prefix`), as `kind`.

    `kind` is a msgspec Struct with at least `iss` and `exp`; unknown fields are ignored.
    Raises JwtError for anything short of a well-formed, correctly signed, unexpired token.
    """
    if len(token) > max_bytes:
        raise JwtError(f"token over {max_bytes} bytes")
    parts = token.split(b".")
    if len(parts) != 3:
        raise JwtError("not three parts")
    try:
        header = msgspec.json.decode(_unb64(parts[0]), type=dict[str, str])
    except msgspec.DecodeError:
        raise JwtError("unreadable header") from None
    if header.get("typ", "").upper() != "JWT" or header.get("alg", "").lower() != HEADER["alg"]:
        raise JwtError("not an ed25519-nkey JWT")
    try:
        claims = msgspec.json.decode(_unb64(parts[1]), type=kind)
    except msgspec.DecodeError as exc:
        raise JwtError(f"unreadable claims: {str(exc)[:120]}") from None
    issuer = getattr(claims, "iss", "")
    signature = _unb64(parts[2])
    if not isinstance(issuer, str) or not verify(issuer, issuer_prefix, parts[0] + b"." + parts[1], signature):
        raise JwtError("not signed by its issuer")
    expires = getattr(claims, "exp", 0)
    if expires and expires < (time.time() if now is None else now):
        raise JwtError("expired")
    return claims
