"""Every response carries `x-request-id`, including the router's own 404s and 405s.

A `before_send` hook rather than a middleware: Litestar answers unknown routes
before any middleware runs, and those responses need an id too.
"""

from __future__ import annotations

from litestar.datastructures import MutableScopeHeaders
from litestar.types import Message, Scope

from services.ids import new_request_id


async def add_request_id(message: Message, scope: Scope) -> None:
    if message["type"] == "http.response.start":
        state = scope.setdefault("state", {})
        request_id = state.setdefault("request_id", new_request_id())
        headers = MutableScopeHeaders.from_message(message)
        if "x-request-id" not in headers:
            headers["x-request-id"] = request_id
