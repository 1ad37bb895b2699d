"""One buyer request's record: metering ticket, timings, the summary log line.

Whatever ends a request (success, error, the buyer hanging up, a timeout),
`finish()` runs exactly once: it settles the reservation and writes the one
summary line, and nothing it does can be interrupted by the cancellation that
may have ended the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import structlog

from schemas import bus
from services.usage.metering import Metering, Ticket

log = structlog.get_logger("gateway")

# Summary status → ledger outcome.
_LEDGER_OUTCOME = {"ok": "ok", "client_disconnected": "cancelled", "request_timeout": "timeout"}


@dataclass
class Exchange:
    request_id: str
    # The summary line's event name, one per surface (chat_completion, text_completion, ...).
    event: str = "chat_completion"
    key_id: int | None = None
    model: str | None = None
    stream: bool = False
    ticket: Ticket | None = None
    started: float = field(default_factory=time.monotonic)
    provider: str | None = None
    cached_tokens: int = 0
    ttft_ms: float | None = None
    status: str = "ok"
    # Set when nothing reached a provider, or providers failed before delivering a token:
    # the request is given back to the quota and nothing is billed.
    refund: bool = False
    _finished: bool = False

    def accepted(self, provider_id: str, accepted: bus.Accepted) -> None:
        self.provider = provider_id
        if self.ticket is not None:
            self.ticket.provider_id = provider_id
            self.ticket.prompt_tokens = accepted.prompt_tokens

    def delta(self, frame: bus.Delta) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = (time.monotonic() - self.started) * 1000
        if self.ticket is not None:
            # What the gateway received, never what the provider declares.
            self.ticket.completion_tokens += len(frame.token_ids)

    def done(self, frame: bus.Done) -> tuple[int, int]:
        """(prompt, completion) tokens to bill: never more completion than the gateway saw."""
        self.cached_tokens = min(frame.cached_tokens, frame.prompt_tokens)
        if self.ticket is None:
            return frame.prompt_tokens, frame.completion_tokens
        self.ticket.prompt_tokens = frame.prompt_tokens
        self.ticket.completion_tokens = min(frame.completion_tokens, self.ticket.completion_tokens)
        return self.ticket.prompt_tokens, self.ticket.completion_tokens

    async def finish(self, metering: Metering) -> None:
        if self._finished:
            return
        self._finished = True
        self._log()
        if self.ticket is not None:
            settling = asyncio.ensure_future(
                metering.settle(
                    self.ticket,
                    # Refunded before any provider took it: unavailable; after (nothing delivered): failed.
                    outcome=_LEDGER_OUTCOME.get(
                        self.status, "unavailable" if self.refund and self.provider is None else "failed"
                    ),
                    cached_tokens=self.cached_tokens,
                    ttft_ms=self.ttft_ms,
                    refund=self.refund,
                )
            )
            # Runs to completion even when the request's own task is being cancelled.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(settling)

    def _log(self) -> None:
        t = self.ticket
        log.info(
            self.event,
            request_id=self.request_id,
            key_id=self.key_id,
            model=self.model,
            provider=self.provider,
            stream=self.stream,
            prompt_tokens=t.prompt_tokens if t else 0,
            completion_tokens=t.completion_tokens if t else 0,
            cached_tokens=self.cached_tokens,
            ttft_ms=None if self.ttft_ms is None else round(self.ttft_ms, 1),
            duration_ms=round((time.monotonic() - self.started) * 1000, 1),
            status=self.status,
        )
