"""Label values the metrics may carry: every one from a known, bounded set.

A label value is a new time series in every Prometheus that scrapes us, kept
for weeks. Buyers choose the path, the method and the model name they send, and
providers the error codes they report, so none of those becomes a label as is:
routes are Litestar's templates (`/v1/responses/{response_id}`, never the id),
methods and error codes come from the sets below, and a model is labelled only
if the pool served it when first seen, and only the first `MAX_MODELS` of
those; everything else is `other`.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable

from schemas import codes
from schemas.device import OAuthErrorCode
from services.errors import ApiError

OTHER = "other"
# The router found no route (a 404 before any handler).
UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Distinct model ids one app labels (a pool serves a handful; more is a flood of fake names).
MAX_MODELS = 64


def _subclasses(cls: type[ApiError]) -> Iterable[type[ApiError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def known_codes() -> frozenset[str]:
    """Every error code the control plane answers or ends a stream with (read when an app is built)."""
    api = {sub.code for sub in _subclasses(ApiError) if sub.code is not None}
    # Besides an ApiError's code, a request ends with its stream's end or its providers' failure codes.
    return frozenset(api | codes.FAIL_CODES | codes.STREAM_ENDS | set(typing.get_args(OAuthErrorCode)))


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER


class CodeLabels:
    def __init__(self, codes: frozenset[str]) -> None:
        self._codes = codes

    def __call__(self, code: str | None) -> str:
        if code is None:
            return "error"
        return code if code in self._codes else OTHER


class ModelLabels:
    """A model id as a label: one the pool served when first seen (up to MAX_MODELS of them), else `other`."""

    def __init__(self, limit: int = MAX_MODELS) -> None:
        self._known: set[str] = set()
        self._limit = limit

    def __call__(self, model: str | None, served: Callable[[str], bool]) -> str:
        if model is None:
            return OTHER
        if model in self._known:
            return model
        if len(self._known) < self._limit and served(model):
            self._known.add(model)
            return model
        return OTHER
