"""SyntheticEngine: NOT a model. Emits a fixed text as fast as it can.

It exists so the benchmark can measure the gateway and bus overhead without
the model's speed drowning it out. It never runs for buyers: the daemon only
uses it when `MP_ENGINE=synthetic` is set explicitly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from daemon.engine import fit
from daemon.engine.base import CancelToken, Capacity, EngineError, Event, Finished, Prepared, TextChunk, Unsupported
from daemon.engine.report import EngineStatus, ModelStatus, SeedWorkerStatus, WorkerStatus
from daemon.machine import Machine
from schemas import bus

WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")


class SyntheticEngine:
    def __init__(
        self, model_id: str = "synthetic", *, slots: int = 256, token_delay_s: float = 0.0, tokens_per_step: int = 1
    ) -> None:
        self.model_id = model_id
        # Tokens produced together per step, as a batched decode step hands several to one request at once.
        self.tokens_per_step = tokens_per_step
        self.slots = slots
        self.context_length = 1 << 20
        self.token_delay_s = token_delay_s
        self._running = 0
        self._tps = 0.0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def prepare(self, request: bus.InferenceRequest) -> Prepared:
        if self._running >= self.slots:
            raise EngineError("provider_busy", "all synthetic slots are busy", retryable=True)
        if request.params.response_format is not None:
            raise EngineError("unsupported_value", "fixed text cannot follow a JSON format", param="response_format")
        words = sum(len(m.content.split()) for m in request.messages)
        # A continuation (the gateway failing over from another provider) carries the tokens already sent:
        # they count against max_tokens, as they do on a real engine (worker_engine.py).
        done = len(request.continuation.token_ids) if request.continuation else 0
        return Prepared(
            request=request,
            prompt_tokens=list(range(words + 4 * len(request.messages) + done)),
            max_tokens=max(1, request.params.max_tokens - done),
        )

    # ---- no model files: nothing to load, unload or assess -----------------------------

    async def load(self, path: Path) -> object:
        raise Unsupported("The synthetic engine has no model to load")

    async def unload(self) -> tuple[str, int]:
        raise Unsupported("No model loaded")

    def admission(self) -> fit.Admission | None:
        return None

    def fit(self, machine: Machine) -> dict[str, Any]:
        raise Unsupported("No model loaded")

    async def health(self) -> SeedWorkerStatus:
        return "healthy"

    async def status(self) -> EngineStatus:
        return EngineStatus(
            model=ModelStatus(loaded=True, name=self.model_id, memory_gb=0.0),
            worker=WorkerStatus(healthy=True, status="healthy"),
        )

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Its capacity changes only with its load, which heartbeats report anyway."""

    def running(self) -> int:
        return self._running

    def queued(self) -> int:
        return 0

    def decode_tps(self) -> float:
        return self._tps

    def serves(self, model: str) -> bool:
        return model == self.model_id

    def capacity(self) -> Capacity:
        return Capacity(
            models=[bus.ModelInfo(id=self.model_id, context_length=self.context_length)],
            slots=self.slots,
            running=self._running,
            queued=0,
            queue_limit=0,
            decode_tps=self._tps,
        )

    async def generate(self, prepared: Prepared, cancel: CancelToken) -> AsyncIterator[Event]:
        self._running += 1
        started = time.monotonic()
        n = 0
        finish: bus.FinishReason = "length"
        request = prepared.request
        # A continuation goes on with the fixed text where the earlier provider stopped.
        offset = len(request.continuation.token_ids) if request.continuation else 0
        try:
            for n in range(1, (prepared.max_tokens or request.params.max_tokens) + 1):
                if cancel.cancelled:
                    finish = "cancelled"
                    n -= 1
                    break
                # Each word is "token" n % len(WORDS): the ids are what the gateway bills.
                word = (offset + n - 1) % len(WORDS)
                yield TextChunk(WORDS[word], 1, token_ids=(word,))
                # Yield to the loop every step, as a real engine's thread hand-off would.
                if n % self.tokens_per_step == 0:
                    await asyncio.sleep(self.token_delay_s)
            elapsed = time.monotonic() - started
            if n > 1 and elapsed > 0:
                self._tps = n / elapsed
            yield Finished(finish, len(prepared.prompt_tokens), n, generation_ms=elapsed * 1000)
        finally:
            self._running -= 1
