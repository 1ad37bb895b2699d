"""The mlx-lm engine: one model, generation on a dedicated thread, FIFO queue.

MLX work stays on one thread (the model is loaded there too); the asyncio side
talks to it through thread-safe queues, so the daemon's event loop keeps
serving heartbeats and cancellations while a token is being computed.
Cancellation is checked between tokens, so a cancelled request stops within
one decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from daemon.engine.base import CancelToken, EngineError, Event, Finished, Prepared, TextChunk
from daemon.engine.text import StopFilter
from schemas import bus

log = structlog.get_logger("daemon.engine")

_ROLE_FOR_TEMPLATE = {"developer": "system"}


@dataclass
class _Job:
    prepared: Prepared
    cancel: CancelToken
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Event | BaseException]
    enqueued: float = field(default_factory=time.monotonic)

    def emit(self, item: Event | BaseException) -> None:
        # RuntimeError: the event loop is gone (daemon shutting down).
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class MlxEngine:
    slots = 1

    def __init__(self, model_path: Path, model_id: str, *, queue_limit: int = 8) -> None:
        self.model_path = model_path
        self.model_id = model_id
        self.queue_limit = queue_limit
        self.context_length = 0
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._waiting = 0
        self._running = 0
        self._tps = 0.0
        self._thread: threading.Thread | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._defaults: dict[str, Any] = {}

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def report(exc: BaseException | None) -> None:
            if not ready.done():
                ready.set_exception(exc) if exc else ready.set_result(None)

        self._thread = threading.Thread(
            target=self._worker, args=(lambda e: loop.call_soon_threadsafe(report, e),), name="mlx-engine", daemon=True
        )
        self._thread.start()
        await ready

    async def close(self) -> None:
        if self._thread is None:
            return
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join, 30)
        self._thread = None

    def _load(self) -> None:
        from mlx_lm import load

        started = time.monotonic()
        self._model, self._tokenizer = load(str(self.model_path))[:2]
        config = json.loads((self.model_path / "config.json").read_text())
        self.context_length = int(config.get("max_position_embeddings") or 4096)
        gen_config = self.model_path / "generation_config.json"
        if gen_config.exists():
            # The model author's sampling defaults apply when a request omits a field.
            raw = json.loads(gen_config.read_text())
            self._defaults = {k: raw[k] for k in ("temperature", "top_p") if k in raw}
        self._warm_up()
        log.info("model_loaded", model=self.model_id, seconds=round(time.monotonic() - started, 2))

    def _warm_up(self) -> None:
        # mlx compiles its CPU kernels on first use; pay that here, not on a buyer's request.
        from mlx_lm import stream_generate

        for _ in stream_generate(self._model, self._tokenizer, [1, 2, 3], max_tokens=2):
            pass

    def _worker(self, report: Any) -> None:
        try:
            self._load()
        except BaseException as exc:
            report(exc)
            return
        report(None)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._waiting -= 1
            self._running = 1
            try:
                self._generate(job)
            except BaseException as exc:
                log.exception("generation_failed", request_id=job.prepared.request.request_id)
                job.emit(exc)
            finally:
                self._running = 0

    # ---- the asyncio side --------------------------------------------------------------

    def running(self) -> int:
        return self._running

    def queued(self) -> int:
        return self._waiting

    def decode_tps(self) -> float:
        return self._tps

    def prepare(self, request: bus.InferenceRequest) -> Prepared:
        if self._waiting >= self.queue_limit:
            raise EngineError("provider_busy", "the provider's queue is full", retryable=True)
        messages = [{"role": _ROLE_FOR_TEMPLATE.get(m.role, m.role), "content": m.content} for m in request.messages]
        try:
            tokens = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:
            raise EngineError("invalid_messages", f"the model's chat template rejected the messages: {exc}") from None
        if isinstance(tokens, dict):  # some tokenizers return a BatchEncoding
            tokens = tokens["input_ids"]
        tokens = list(tokens)
        if len(tokens) >= self.context_length:
            raise EngineError(
                "context_length_exceeded",
                f"the prompt has {len(tokens)} tokens; this model's context is {self.context_length}",
            )
        return Prepared(request=request, prompt_tokens=tokens)

    async def generate(self, prepared: Prepared, cancel: CancelToken) -> AsyncIterator[Event]:
        out: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        job = _Job(prepared, cancel, asyncio.get_running_loop(), out)
        self._waiting += 1
        self._jobs.put(job)
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise EngineError("engine_error", f"generation failed: {item}") from item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            # Whatever ended the consumer (cancel, error, disconnect), stop the computation.
            if not cancel.cancelled:
                cancel.cancel("consumer_closed")

    # ---- the MLX thread -----------------------------------------------------------------

    def _generate(self, job: _Job) -> None:
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        request = job.prepared.request
        params = request.params
        prompt = job.prepared.prompt_tokens
        started = time.monotonic()
        queue_ms = (started - job.enqueued) * 1000
        if job.cancel.cancelled:
            job.emit(Finished("cancelled", len(prompt), 0, queue_ms=queue_ms))
            return
        temperature = params.temperature if params.temperature is not None else self._defaults.get("temperature", 1.0)
        top_p = params.top_p if params.top_p is not None else self._defaults.get("top_p", 1.0)
        sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0)
        processors = make_logits_processors(
            presence_penalty=params.presence_penalty or None,
            frequency_penalty=params.frequency_penalty or None,
        )
        if params.seed is not None:
            mx.random.seed(params.seed)
        max_tokens = max(1, min(params.max_tokens, self.context_length - len(prompt)))
        deadline = request.deadline_ms / 1000 if request.deadline_ms else None
        stops = StopFilter(params.stop)
        tokens = 0
        unsent_tokens = 0
        first_token_at: float | None = None
        finish: bus.FinishReason = "length"
        for response in stream_generate(
            self._model,
            self._tokenizer,
            mx.array(prompt),
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
        ):
            if first_token_at is None:
                first_token_at = time.monotonic()
            # The last response of an EOS stop carries the EOS token, which is not output.
            if response.finish_reason != "stop":
                tokens += 1
                unsent_tokens += 1
            text = stops.feed(response.text)
            if text:
                job.emit(TextChunk(text, unsent_tokens))
                unsent_tokens = 0
            if stops.stopped:
                finish = "stop"
                break
            if response.finish_reason is not None:
                finish = "stop" if response.finish_reason == "stop" else "length"
                break
            if job.cancel.cancelled or (deadline is not None and time.time() > deadline):
                finish = "cancelled"
                break
        tail = stops.flush() if finish != "cancelled" else ""
        if tail or unsent_tokens:
            job.emit(TextChunk(tail, unsent_tokens))
        ended = time.monotonic()
        first = first_token_at or ended
        if tokens > 1 and ended > first:
            rate = (tokens - 1) / (ended - first)
            self._tps = rate if self._tps == 0 else 0.8 * self._tps + 0.2 * rate
        job.emit(
            Finished(
                finish_reason=finish,
                prompt_tokens=len(prompt),
                completion_tokens=tokens,
                queue_ms=queue_ms,
                ttft_ms=(first - started) * 1000,
                generation_ms=(ended - started) * 1000,
            )
        )
