"""The small interface between the daemon's front ends (NATS, local API) and an inference engine."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from schemas import bus
from schemas.bus import Finished
from schemas.codes import FailCode, WorkerState

if TYPE_CHECKING:
    from daemon.engine import fit
    from daemon.engine.report import EngineStatus, SeedWorkerStatus
    from daemon.machine import Machine


class EngineError(Exception):
    """A request the engine cannot run. `code` goes back to the gateway; `param` names a bad field."""

    def __init__(self, code: FailCode, message: str, *, retryable: bool = False, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.param = param


class Unsupported(Exception):
    """The engine cannot do this (no model loaded, or an engine with no model files): a 400 on the admin API."""


@dataclass(frozen=True, slots=True)
class ThinkTags:
    """The tags around a thinking model's reasoning (the tokenizer's: `<think>`, `</think>`, ...)."""

    start: str
    end: str
    # The prompt already opened the block (a Qwen3-style generation prompt ends with `<think>`):
    # the answer begins inside it.
    opened: bool = False


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request turned into prompt tokens, ready to queue."""

    request: bus.InferenceRequest
    prompt_tokens: list[int]
    # Generation limit after clipping to the context and memory budget (0: use request.params.max_tokens).
    max_tokens: int = 0
    # Set for chat requests on a model that thinks: its output is split into reasoning and answer.
    think: ThinkTags | None = None
    # The llguidance grammar of request.params.response_format (daemon/engine/structured.py).
    grammar: str | None = None


class TextChunk(msgspec.Struct, frozen=True, gc=False):
    """Text an engine has ready. A Struct rather than a frozen dataclass: one is made per token, and a
    frozen dataclass's __init__ sets each field through object.__setattr__ (50 bytecodes a token)."""

    text: str
    tokens: int
    tool_calls: tuple[bus.ToolCall, ...] = ()
    logprobs: tuple[bus.TokenLogprob, ...] = ()
    # The ids of the `tokens` tokens, so the gateway can hand the answer to another provider.
    token_ids: tuple[int, ...] = ()
    # Thinking-channel text (tags removed), which came before `text`.
    reasoning: str = ""


# The answer's pieces, then exactly one bus.Finished (the `Done` frame's body).
Event = TextChunk | Finished


@dataclass
class CancelToken:
    """Set by a front end (bus cancel, client hang-up); the engine stops at the next token."""

    event: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    _callbacks: list[Callable[[], None]] = field(default_factory=list)

    def cancel(self, reason: str) -> None:
        if self.event.is_set():
            return
        self.reason = reason
        self.event.set()
        for callback in self._callbacks:
            with contextlib.suppress(Exception):
                callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Run `callback` when cancelled (at once if already cancelled)."""
        if self.event.is_set():
            callback()
        else:
            self._callbacks.append(callback)

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()


@dataclass(frozen=True, slots=True)
class Capacity:
    """What a heartbeat says about the engine right now."""

    models: list[bus.ModelInfo]
    slots: int
    running: int
    queued: int
    queue_limit: int
    decode_tps: float
    worker: WorkerState = "healthy"
    # False while the engine cannot take work (worker restarting after a crash).
    accepting: bool = True


class Engine(Protocol):
    """What the daemon's front ends (NATS, local API, admin API, metrics) use of an engine."""

    @property
    def model_id(self) -> str:
        """The loaded model's id ("" when none is loaded)."""
        ...

    @property
    def context_length(self) -> int: ...

    @property
    def slots(self) -> int: ...

    async def start(self) -> None:
        """Load the model (may take seconds) and warm up."""

    async def close(self) -> None: ...

    # ---- requests ----------------------------------------------------------------------

    async def prepare(self, request: bus.InferenceRequest) -> Prepared:
        """Tokenize and check limits, off the event loop; raises EngineError for a request that cannot run."""
        ...

    def generate(self, prepared: Prepared, cancel: CancelToken) -> AsyncIterator[Event]:
        """Text chunks then exactly one Finished, unless failed (raises EngineError)."""
        ...

    # ---- load and admission ------------------------------------------------------------

    async def load(self, path: Path) -> object:
        """Load the model folder at `path` instead of the current one; raises EngineError or Unsupported."""
        ...

    async def unload(self) -> tuple[str, int]:
        """Forget the model: (its id, resident bytes freed); raises Unsupported when none is loaded."""
        ...

    def admission(self) -> fit.Admission | None:
        """The memory budget's limits for the loaded model (None: no model, or no budget applies)."""
        ...

    def fit(self, machine: Machine) -> dict[str, Any]:
        """Seed 002's fit report for the loaded model; raises Unsupported when none is loaded."""
        ...

    # ---- health and listeners ----------------------------------------------------------

    async def health(self) -> SeedWorkerStatus:
        """The worker's state as seed 001 names it, after asking the worker when it should be up."""
        ...

    async def status(self) -> EngineStatus:
        """The engine's part of /admin/status."""
        ...

    def add_listener(self, callback: Callable[[], None]) -> None:
        """`callback` runs whenever what `capacity` says changes (the daemon heartbeats at once)."""

    def running(self) -> int: ...

    def queued(self) -> int: ...

    def decode_tps(self) -> float: ...

    def capacity(self) -> Capacity: ...

    def serves(self, model: str) -> bool: ...
