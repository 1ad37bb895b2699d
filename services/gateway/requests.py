"""Parsing buyer request bodies into wire types, with OpenAI-style errors."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from services.errors import InvalidJson, InvalidRequest

T = TypeVar("T")

_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_REGEX = re.compile(r"Expected `str` matching regex '.*'")


_INT_AS_FLOAT = "Expected `int`, got `float`"


def _integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    return value


def decode_body(body: bytes, kind: type[T]) -> T:
    if not body.strip():
        raise InvalidJson("The request body is empty; send a JSON object.")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        # msgspec validates while parsing; a broken document must still be called broken JSON.
        try:
            document = msgspec.json.decode(body)
        except msgspec.DecodeError as syntax:
            raise InvalidJson(f"The request body is not valid JSON: {syntax}.") from None
        if _INT_AS_FLOAT in str(exc):
            # JSON does not tell 3 from 3.0 and JSON Schema calls both integers; msgspec only the first.
            try:
                return msgspec.convert(_integral_floats_as_ints(document), type=kind)
            except msgspec.ValidationError as again:
                exc = again
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
