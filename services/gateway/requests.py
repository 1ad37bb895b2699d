"""Parsing buyer request bodies into wire types, with OpenAI-style errors."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from services.errors import InvalidJson, InvalidRequest

T = TypeVar("T")

_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_REGEX = re.compile(r"Expected `str` matching regex '.*'")


def decode_body(body: bytes, kind: type[T]) -> T:
    if not body.strip():
        raise InvalidJson("The request body is empty; send a JSON object.")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        # msgspec validates while parsing; a broken document must still be called broken JSON.
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError as syntax:
            raise InvalidJson(f"The request body is not valid JSON: {syntax}.") from None
        text = str(exc)
        match = _PATH.search(text)
        param = match.group("path") if match else None
        detail = _REGEX.sub(
            "contains characters that are not allowed (whitespace, control characters, * or >)", _PATH.sub("", text)
        )
        if param:
            raise InvalidRequest(f"Invalid value for '{param}': {detail}.", param=param) from None
        raise InvalidRequest(f"Invalid request body: {detail}.") from None
    except msgspec.DecodeError as exc:
        raise InvalidJson(f"The request body is not valid JSON: {exc}.") from None
