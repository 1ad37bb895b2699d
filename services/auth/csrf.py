"""CSRF tokens for the session's HTML forms: an HMAC of the session token, checked on every POST.

SameSite=Lax and the Origin check (sessions.check_origin) already keep other sites'
pages out; the token is the lock that needs neither (an old browser, a client that
sends no Origin). It is derived, not stored: HMAC-SHA256 of the session token under
the deployment's secret key, so every replica checks it, it changes with every
sign-in, and it is worthless without the session cookie it belongs to.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from litestar import Request

from services.auth.sessions import session_token
from services.settings import Settings

# The hidden form field.
FIELD = "csrf"
_CONTEXT = b"mac-provider csrf v1\x00"


def _token(settings: Settings, session: str) -> str:
    mac = hmac.new(settings.secret_key, _CONTEXT + session.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def csrf_token(request: Request[Any, Any, Any], settings: Settings) -> str:
    """The token this browser's forms carry; empty without a session (such a form can do nothing)."""
    session = session_token(request, settings)
    return _token(settings, session) if session else ""


def csrf_ok(request: Request[Any, Any, Any], settings: Settings, presented: object) -> bool:
    session = session_token(request, settings)
    if session is None or not isinstance(presented, str) or not presented or len(presented) > 64:
        return False
    return hmac.compare_digest(presented.encode(), _token(settings, session).encode())
