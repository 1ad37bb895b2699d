"""Every response carries `x-request-id`, including the router's own 404s and 405s.

A `before_send` hook rather than a middleware: Litestar answers unknown routes
before any middleware runs, and those responses need an id too.
"""

from __future__ import annotations

from litestar.datastructures import MutableScopeHeaders
from litestar.types import Message, Scope

from services.ids import ensure_request_id


async def add_request_id(message: Message, scope: Scope) -> None:
    if message["type"] == "http.response.start":
        request_id = ensure_request_id(scope.setdefault("state", {}))
        # Looked for in the raw list: MutableScopeHeaders' `in` decodes every header of the response.
        if not any(name.lower() == b"x-request-id" for name, _ in message.get("headers", ())):
            MutableScopeHeaders.from_message(message)["x-request-id"] = request_id
