"""Counting every HTTP response by route template, method and status (and errors by their code).

A `before_send` hook rather than a middleware, like services/middleware.py: the
router answers unknown routes and wrong methods before any middleware runs, and
those answers are counted too (route `unmatched`). It acts on the response's
start only; a stream's later chunks pass through it with one comparison.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from litestar.types import Message, Scope

from services.errors import ERROR_CODE
from services.metrics.labels import UNMATCHED, method_label
from services.metrics.registry import Metrics


def count_responses(metrics: Metrics) -> Callable[[Message, Scope], Awaitable[None]]:
    codes = metrics.codes

    async def hook(message: Message, scope: Scope) -> None:
        if message["type"] != "http.response.start":
            return
        route = scope.get("path_template") or UNMATCHED
        status = message["status"]
        metrics.http(route, method_label(str(scope.get("method", ""))), str(status)).inc()
        if status >= 400:
            state = scope.get("state")
            metrics.http_error(route, codes(state.get(ERROR_CODE) if state else None)).inc()

    return hook
