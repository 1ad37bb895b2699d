"""Parsing buyer request bodies into wire types, with OpenAI-style errors (the decoder: schemas/body.py)."""

from __future__ import annotations

from typing import TypeVar

from schemas import body as wire_body
from services.errors import InvalidJson, InvalidRequest

T = TypeVar("T")


def decode_body(body: bytes, kind: type[T]) -> T:
    """The body as `kind`, or a 400 naming the field: bad JSON, a bad value, a bound of schemas/limits.py."""
    try:
        return wire_body.decode(body, kind)
    except wire_body.BodyError as exc:
        if exc.code == "invalid_json":
            raise InvalidJson(exc.message) from None
        raise InvalidRequest(exc.message, param=exc.param) from None
