"""Request ids: one per HTTP request, returned in `x-request-id` and used on the bus."""

from __future__ import annotations

import secrets
from typing import Any

from litestar import Request


def new_request_id() -> str:
    # 96 random bits, hex: safe as a NATS subject token and short enough to read out.
    return secrets.token_hex(12)


def request_id_of(request: Request[Any, Any, Any]) -> str:
    return ensure_request_id(request.scope["state"])


def ensure_request_id(state: dict[str, Any]) -> str:
    """The id kept in a scope's state, made the first time (not `setdefault(..., new_request_id())`:
    that drew random bytes, a getrandom syscall, on every call)."""
    rid: str | None = state.get("request_id")
    if rid is None:
        rid = state["request_id"] = new_request_id()
    return rid
