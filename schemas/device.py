"""Device login on the wire (RFC 8628): what `mac-provider-daemon login` and the control plane exchange.

`POST /provider/device/code` answers a `DeviceCode`; `POST /provider/device/token`
answers a `DeviceToken` once the owner approved the code in the browser, and
until then an `OAuthError` (RFC 6749 §5.2 / RFC 8628 §3.5: `authorization_pending`,
`slow_down`, ...): OAuth device clients expect that shape, not the OpenAI envelope.

Both sides decode with these types, and each distrusts the other: the constraints
below are what the daemon accepts from a control plane (it prints some of these
strings on its owner's terminal) as much as what the control plane promises.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 §6.1's base-20 alphabet: no vowels (no words), no digits (no 0/O, 1/I).
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8  # 20^8 ≈ 2.6e10 codes (~34 bits), shown as XXXX-XXXX
MAX_NAME = 64
MAX_INTERVAL_S = 60
MAX_EXPIRES_IN_S = 3600
SLOW_DOWN_STEP_S = 5

# A URL printed on the owner's terminal: http(s), and no blanks or control characters (escapes).
_PRINTABLE_URL = r"^https?://[^\s\x00-\x1f\x7f-\x9f]+$"
_NAME = r"^[^\x00-\x1f\x7f-\x9f]*$"

OAuthErrorCode = Literal[
    "authorization_pending",
    "slow_down",
    "access_denied",
    "expired_token",
    "invalid_grant",
    "invalid_request",
    "unsupported_grant_type",
    # Not OAuth's: too many requests from this client (HTTP 429, with Retry-After).
    "rate_limited",
]


class DeviceCodeRequest(msgspec.Struct, frozen=True):
    """The device authorization request (JSON or form-encoded). Unknown parameters are ignored (RFC 6749 §3.1)."""

    # OAuth's public client id; accepted and not checked (there is one client: the daemon).
    client_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    # A name for this Mac the daemon suggests (`login --name`, default its host name).
    name: Annotated[str, msgspec.Meta(max_length=MAX_NAME, pattern=_NAME)] = ""


class DeviceCode(msgspec.Struct, frozen=True):
    device_code: Annotated[str, msgspec.Meta(min_length=20, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
    user_code: Annotated[str, msgspec.Meta(pattern=r"^[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}$")]
    verification_uri: Annotated[str, msgspec.Meta(max_length=2048, pattern=_PRINTABLE_URL)]
    verification_uri_complete: Annotated[str, msgspec.Meta(max_length=2048, pattern=_PRINTABLE_URL)]
    expires_in: Annotated[int, msgspec.Meta(ge=1, le=MAX_EXPIRES_IN_S)]
    interval: Annotated[int, msgspec.Meta(ge=1, le=MAX_INTERVAL_S)]


class DeviceTokenRequest(msgspec.Struct, frozen=True):
    """The device access token request (RFC 8628 §3.4), JSON or form-encoded."""

    grant_type: Annotated[str, msgspec.Meta(max_length=256)]
    device_code: Annotated[str, msgspec.Meta(max_length=256)]
    client_id: Annotated[str, msgspec.Meta(max_length=128)] = ""


class DeviceToken(msgspec.Struct, frozen=True):
    """The provider's credentials: the `mpp_` token, the id it speaks for, and where to connect."""

    access_token: Annotated[str, msgspec.Meta(pattern=r"^mpp_[0-9A-Za-z]{36}$")]
    provider_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    name: Annotated[str, msgspec.Meta(max_length=MAX_NAME, pattern=_NAME)]
    # The NATS URL providers connect to (never with the control plane's own credentials).
    nats_url: Annotated[str, msgspec.Meta(max_length=2048, pattern=r"^[a-z]+://[^\s\x00-\x1f\x7f-\x9f]+$")]
    token_type: Literal["Bearer"] = "Bearer"

    def __repr__(self) -> str:  # never the token, whatever prints this
        return f"DeviceToken(provider_id={self.provider_id!r}, name={self.name!r}, access_token=<redacted>)"


class OAuthError(msgspec.Struct, frozen=True, omit_defaults=True):
    error: OAuthErrorCode
    error_description: Annotated[str, msgspec.Meta(max_length=512, pattern=_NAME)] = ""
    # With slow_down (and authorization_pending): the seconds the client must now wait between polls.
    interval: Annotated[int, msgspec.Meta(ge=1, le=MAX_INTERVAL_S)] | None = None


def normalize_user_code(raw: str) -> str | None:
    """The 8 letters of a code as typed (any case, with or without the dash or blanks); None if not a code."""
    if len(raw) > 32:
        return None
    code = "".join(raw.split()).replace("-", "").upper()
    if len(code) != USER_CODE_LENGTH or any(c not in USER_CODE_ALPHABET for c in code):
        return None
    return code


def display_user_code(code: str) -> str:
    """XXXX-XXXX."""
    return f"{code[:4]}-{code[4:]}"
