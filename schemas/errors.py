"""The OpenAI error envelope: `{"error": {"message", "type", "code", "param"}}`."""

from __future__ import annotations

import msgspec


class ErrorBody(msgspec.Struct, frozen=True):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorEnvelope(msgspec.Struct, frozen=True):
    error: ErrorBody
