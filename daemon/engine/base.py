"""The small interface between the daemon's bus handling and an inference engine."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from schemas import bus


class EngineError(Exception):
    """A request the engine cannot run. `code` goes back to the gateway."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request turned into prompt tokens, ready to queue."""

    request: bus.InferenceRequest
    prompt_tokens: list[int]


@dataclass(frozen=True, slots=True)
class TextChunk:
    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: bus.FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    generation_ms: float = 0.0


Event = TextChunk | Finished


@dataclass
class CancelToken:
    """Set by the bus side; checked by the engine between tokens."""

    event: threading.Event = field(default_factory=threading.Event)
    reason: str = ""

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self.event.set()

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()


class Engine(Protocol):
    model_id: str
    context_length: int
    slots: int

    async def start(self) -> None:
        """Load the model (may take seconds) and warm up."""

    async def close(self) -> None: ...

    def prepare(self, request: bus.InferenceRequest) -> Prepared:
        """Tokenize and check limits; raises EngineError for a request that cannot run."""
        ...

    def generate(self, prepared: Prepared, cancel: CancelToken) -> AsyncIterator[Event]:
        """Text chunks then exactly one Finished, unless cancelled or failed (raises)."""
        ...

    def running(self) -> int: ...

    def queued(self) -> int: ...

    def decode_tps(self) -> float: ...
