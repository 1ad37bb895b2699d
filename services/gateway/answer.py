"""A non-stream answer written straight to the ASGI server.

Litestar's `Response` becomes an `ASGIResponse` through a chain of merges (layered
headers, cookies, type encoders, a `MutableScopeHeaders` per header): on a
non-stream completion that was as much CPU as the provider's whole answer took
to decode. The body here is the answer's struct in JSON (what Litestar's msgspec
encoder makes of it), with the same headers in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from litestar import Response
from litestar.types import ASGIApp, Receive, Scope, Send

from services.gateway.sse import SERVER_SEND

_ENCODER = msgspec.json.Encoder()
_JSON = b"application/json"


class JsonAnswer(Response[None]):
    """A 200 answer whose body is `content` in JSON."""

    def __init__(self, content: msgspec.Struct, headers: Mapping[str, str]) -> None:
        super().__init__(content=None)
        self.body = _ENCODER.encode(content)
        self._raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self._raw_headers += [(b"content-type", _JSON), (b"content-length", str(len(self.body)).encode())]

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIApp:  # type: ignore[override]
        # Already what the server needs: no conversion.
        return self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._raw_headers})
        # The body skips the app's send hooks, as a stream's chunks do (they all act on the start only).
        send = scope.get(SERVER_SEND, send)  # type: ignore[assignment]
        await send({"type": "http.response.body", "body": self.body, "more_body": False})
