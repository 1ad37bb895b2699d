"""The client's IP address, for per-client limits.

Behind N trusted proxies (MP_TRUSTED_PROXY_HOPS) each appends the address it saw
to X-Forwarded-For, so the client is the N-th entry from the right; entries left
of it are whatever the client chose to send and are ignored. With no trusted
proxy the peer address is the client, whatever the headers say (uvicorn's own
proxy-header handling is off: services/cli.py). Nothing else (Forwarded,
X-Real-IP, X-Forwarded-Proto, Host) is read for any decision.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from litestar.connection import ASGIConnection


def _normalized(value: str) -> str | None:
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d: one client, one spelling.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def client_ip(request: ASGIConnection[Any, Any, Any, Any], *, trusted_hops: int) -> str:
    raw_peer = request.client.host if request.client else "unknown"
    peer = _normalized(raw_peer) or raw_peer
    if trusted_hops <= 0:
        return peer
    hops = [h for raw in request.headers.getall("x-forwarded-for", []) for h in raw.split(",") if h.strip()]
    if len(hops) < trusted_hops:
        return peer
    return _normalized(hops[-trusted_hops]) or peer


def net64(ip: str) -> str | None:
    """The /64 an IPv6 address belongs to (`2001:db8:1:2::/64`); None for IPv4 or a non-address.

    One subscriber gets at least a /64 and can use any of its 2^64 addresses, so a
    limit per IPv6 address alone limits nothing.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if not isinstance(address, ipaddress.IPv6Address) or address.ipv4_mapped is not None:
        return None
    return f"{ipaddress.IPv6Address(int(address) >> 64 << 64)}/64"


def client_key(ip: str) -> str:
    """Who a per-client budget is counted against: an IPv4 address, or an IPv6 client's /64."""
    return net64(ip) or ip
