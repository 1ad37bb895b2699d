"""The client's IP address, for per-IP limits.

Behind N trusted proxies (MP_TRUSTED_PROXY_HOPS) each appends the address it saw
to X-Forwarded-For, so the client is the N-th entry from the right; entries left
of it are whatever the client chose to send and are ignored.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from litestar import Request


def _normalized(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


def client_ip(request: Request[Any, Any, Any], *, trusted_hops: int) -> str:
    peer = request.client.host if request.client else "unknown"
    if trusted_hops <= 0:
        return peer
    hops = [h for raw in request.headers.getall("x-forwarded-for", []) for h in raw.split(",") if h.strip()]
    if len(hops) < trusted_hops:
        return peer
    return _normalized(hops[-trusted_hops]) or peer
