"""Reading and parsing buyer request bodies into wire types, with OpenAI-style errors (the decoder: schemas/body.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from litestar import Request

from schemas import body as wire_body
from services.auth.bearer import header
from services.errors import BodyTimeout, BodyTooLarge, ClientDisconnected, InvalidJson, InvalidRequest
from services.http_head import BODY_ARRIVED

T = TypeVar("T")


async def read_body(request: Request[Any, Any, Any], timeout_s: float) -> bytes:
    """The whole body, at most the route's `request_max_body_size` (413 request_too_large past it),
    within `timeout_s` (408 body_timeout: a client trickling its body holds a connection and a task).

    Read from the ASGI messages: Litestar's `Request.body()` parses every header into a multidict for
    `content-length` first, a sixth of what reading a body costs the gateway.
    """
    limit = request.route_handler.resolve_request_max_body_size() or float("inf")
    announced = header(request, b"content-length")
    # uvicorn's parser has refused a malformed length already; a huge one is refused before reading.
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise _too_large(limit)
    arrived: Callable[[], bool] | None = request.scope.get(BODY_ARRIVED)  # type: ignore[assignment]
    if arrived is not None and arrived():
        # The server holds all of it (its task starts once it has: services/http_head.py): no timer.
        return await _read(request, limit)
    try:
        async with asyncio.timeout(timeout_s):
            return await _read(request, limit)
    except TimeoutError:
        raise BodyTimeout(
            f"The request body did not arrive within {timeout_s:g} s of its headers.",
            headers={"connection": "close"},
        ) from None


async def _read(request: Request[Any, Any, Any], limit: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("The client hung up before its request body arrived.")
        chunk: bytes = message.get("body", b"")  # type: ignore[assignment]
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: float) -> BodyTooLarge:
    return BodyTooLarge(f"The request body is larger than the {int(limit):,} bytes this endpoint accepts.")


def decode_body(body: bytes, kind: type[T]) -> T:
    """The body as `kind`, or a 400 naming the field: bad JSON, a bad value, a bound of schemas/limits.py."""
    try:
        return wire_body.decode(body, kind)
    except wire_body.BodyError as exc:
        if exc.code == "invalid_json":
            raise InvalidJson(exc.message) from None
        raise InvalidRequest(exc.message, param=exc.param) from None
