"""URLs as logs and answers may show them, for the control plane and the daemon alike."""

from __future__ import annotations

import re

# One URL: its scheme, then everything up to the next URL's scheme or a blank. Its user info
# ends at the last "@" in there (a password may hold a raw "/", "," or "@": hiding too
# much beats showing part of a secret).
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>(?:(?![A-Za-z][A-Za-z0-9+.-]*://)\S)*)")
# libpq takes a password as a query parameter too; NATS a token.
_SECRET_PARAM = re.compile(r"(?P<name>[?&](?:password|sslpassword|token|pass)=)[^&#\s]*", re.IGNORECASE)
# Schemes whose lone user name (no ":password") is a login, not a NATS token.
_LOGIN_SCHEMES = ("postgres", "postgresql")
REDACTED = "***"


def _without_credentials(match: re.Match[str]) -> str:
    scheme, rest = match.group("scheme"), match.group("rest")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return match.group(0)
    user, colon, _ = userinfo.partition(":")
    if colon:
        return f"{scheme}{user}:{REDACTED}@{host}"
    if scheme.removesuffix("://").lower() in _LOGIN_SCHEMES:
        return match.group(0)
    return f"{scheme}{REDACTED}@{host}"  # nats://TOKEN@host


def redact_url(url: str) -> str:
    """`url` (or a text holding URLs) safe to log: passwords and tokens replaced by ***.

    The user name stays (it says who connects); `nats://token@host` loses its token.
    """
    return _SECRET_PARAM.sub(lambda m: m.group("name") + REDACTED, _URL.sub(_without_credentials, url))
