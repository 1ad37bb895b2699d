"""Parsing buyer request bodies into wire types, with OpenAI-style errors."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from schemas import limits
from services.errors import InvalidJson, InvalidRequest

T = TypeVar("T")


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
    """The body as `kind`, or a 400 naming the field: bad JSON, a bad value, a bound of schemas/limits.py."""
    if not body.strip():
        raise InvalidJson("The request body is empty; send a JSON object.")
    try:
        return _decode(body, kind)
    except limits.LimitExceeded as exc:
        raise InvalidRequest(exc.message, param=exc.param) from None
    except RecursionError:
        # Nested past what the decoder follows (about a thousand levels): find the field.
        param = limits.deep_field(body, kind)
        at = f"'{param}'" if param else "the request body"
        raise InvalidRequest(
            f"Invalid value for {at}: JSON nested more than {limits.MAX_JSON_DEPTH} levels deep.", param=param
        ) from None


def _decode(body: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        # msgspec validates while parsing; a broken document must still be called broken JSON.
        try:
            document = msgspec.json.decode(body)
        except msgspec.DecodeError as syntax:
            raise InvalidJson(f"The request body is not valid JSON: {syntax}.") from None
        except RecursionError:
            document = None  # nested too deep to read untyped: the typed error names the field
        if document is not None and _INT_AS_FLOAT in str(exc):
            # JSON does not tell 3 from 3.0 and JSON Schema calls both integers; msgspec only the first.
            try:
                return msgspec.convert(_integral_floats_as_ints(document), type=kind)
            except msgspec.ValidationError as again:
                exc = again
        param, detail = limits.explain(exc)
        if param:
            raise InvalidRequest(f"Invalid value for '{param}': {detail}.", param=param) from None
        raise InvalidRequest(f"Invalid request body: {detail}.") from None
    except msgspec.DecodeError as exc:
        raise InvalidJson(f"The request body is not valid JSON: {exc}.") from None
