"""A request body as a wire type, or an error naming the field: one decoder for the gateway and the local API.

Each side maps `BodyError` to its own 400 (services/errors.py, daemon/api/common.py);
the messages and the `param` are the same everywhere. The bounds of schemas/limits.py
hold during decoding.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

import msgspec

from schemas import limits

T = TypeVar("T")

# msgspec's words for an integral float where an int (or an optional int) is expected.
_INT_AS_FLOAT = re.compile(r"Expected `int( \| null)?`, got `float`")


class BodyError(ValueError):
    """The body is not JSON ("invalid_json") or not a valid request ("invalid_value", naming `param`)."""

    def __init__(self, message: str, *, code: Literal["invalid_json", "invalid_value"], param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


def _integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    return value


def decode(body: bytes, kind: type[T]) -> T:
    """The body as `kind`; raises BodyError for an empty or broken document, a bad value or a bound."""
    if not body.strip():
        raise BodyError("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return _decode(body, kind)
    except limits.LimitExceeded as exc:
        raise BodyError(exc.message, code="invalid_value", param=exc.param) from None
    except RecursionError:
        # Nested past what the decoder follows (about a thousand levels): find the field.
        param = limits.deep_field(body, kind)
        at = f"'{param}'" if param else "the request body"
        message = f"Invalid value for {at}: JSON nested more than {limits.MAX_JSON_DEPTH} levels deep."
        raise BodyError(message, code="invalid_value", param=param) from None


def _decode(body: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        # msgspec validates while parsing; a broken document must still be called broken JSON.
        try:
            document = msgspec.json.decode(body)
        except msgspec.DecodeError as syntax:
            raise BodyError(f"The request body is not valid JSON: {syntax}.", code="invalid_json") from None
        except RecursionError:
            document = None  # nested too deep to read untyped: the typed error names the field
        if document is not None and _INT_AS_FLOAT.search(str(exc)):
            # JSON does not tell 3 from 3.0 and JSON Schema calls both integers; msgspec only the first.
            try:
                return msgspec.convert(_integral_floats_as_ints(document), type=kind)
            except msgspec.ValidationError as again:
                exc = again
        param, detail = limits.explain(exc)
        if param:
            raise BodyError(f"Invalid value for '{param}': {detail}.", code="invalid_value", param=param) from None
        raise BodyError(f"Invalid request body: {detail}.", code="invalid_value") from None
    except msgspec.DecodeError as exc:
        raise BodyError(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
