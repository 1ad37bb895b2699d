"""Browser demo tokens: short-lived, HMAC-signed, checked without any database query.

Format: `mpd_<base64url(JSON claims)>.<base64url(HMAC-SHA256)>`. The `mpd_`
prefix tells them from `mp_` keys at a glance (and to secret scanners). The
token id (`jti`) is random and stable for the token's life, so quotas can be
counted per demo token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from services.errors import InvalidDemoToken

PREFIX = "mpd_"
_VERSION = 1
# Far above a real token (about 130 characters); anything longer is not parsed.
_MAX_LENGTH = 512
_SHAPE = re.compile(r"^mpd_([A-Za-z0-9_-]{16,400})\.([A-Za-z0-9_-]{43})$")
# Tolerated clock difference between the replica that issued a token and the one checking it.
_SKEW_S = 30


class _Claims(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    jti: str
    iat: int
    exp: int


@dataclass(frozen=True, slots=True)
class DemoToken:
    token_id: str
    issued_at: int
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class DemoTokens:
    def __init__(self, secret: bytes, *, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        # A key of its own, derived from the deployment secret: it signs nothing else.
        self._key = hmac.new(secret, b"mac-provider demo token v1", hashlib.sha256).digest()
        self._ttl_s = ttl_s
        self._clock = clock

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, f"{PREFIX}{payload}".encode(), hashlib.sha256).digest())

    def issue(self, token_id: str | None = None) -> tuple[str, DemoToken]:
        """A new token; with `token_id` (a renewal) the same subject, so its quotas carry on."""
        now = self._clock()
        # Rounded up, so a token lives at least its TTL whatever the fraction of a second.
        jti = token_id or secrets.token_hex(12)
        claims = _Claims(v=_VERSION, jti=jti, iat=int(now), exp=math.ceil(now + self._ttl_s))
        payload = _b64(msgspec.json.encode(claims))
        token = f"{PREFIX}{payload}.{self._sign(payload)}"
        return token, DemoToken(token_id=claims.jti, issued_at=claims.iat, expires_at=claims.exp)

    def verify(self, token: str) -> DemoToken:
        """The token's claims, or InvalidDemoToken (malformed, tampered, or expired)."""
        match = _SHAPE.match(token) if len(token) <= _MAX_LENGTH else None
        if match is None:
            raise InvalidDemoToken("Invalid demo token: it is malformed. Get a new one from POST /auth/demo.")
        payload, signature = match.groups()
        if not hmac.compare_digest(signature, self._sign(payload)):
            raise InvalidDemoToken("Invalid demo token: its signature does not match. Get a new one: POST /auth/demo.")
        try:
            claims = msgspec.json.decode(_unb64(payload), type=_Claims)
        except (msgspec.DecodeError, msgspec.ValidationError, binascii.Error, ValueError):
            raise InvalidDemoToken("Invalid demo token. Get a new one from POST /auth/demo.") from None
        now = self._clock()
        if claims.v != _VERSION or claims.iat > now + _SKEW_S:
            raise InvalidDemoToken("Invalid demo token. Get a new one from POST /auth/demo.")
        if now >= claims.exp:
            raise InvalidDemoToken("Demo token expired: refresh the demo session (POST /auth/demo).")
        return DemoToken(token_id=claims.jti, issued_at=claims.iat, expires_at=claims.exp)
