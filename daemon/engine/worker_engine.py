"""The mlx-lm engine: requests are checked and tokenized here, generated in the worker process.

The daemon process holds the tokenizer (small) and everything about a request
that is text: validation, memory admission, detokenization, stop strings, tool
calls; its chat template and JSON schema run in prepare helper processes under
a time limit (daemon/engine/prepare_pool.py). The worker (daemon/worker) holds
the model, the batch and the prompt cache. The NATS side and the local API both
call this one object, so their requests share the same batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog

from daemon.child import log_args
from daemon.engine import fit, prompt, structured
from daemon.engine.base import CancelToken, Capacity, EngineError, Event, Finished, Prepared, Unsupported
from daemon.engine.output import Output, TokenText
from daemon.engine.prepare_pool import PreparePool
from daemon.engine.report import (
    AdmissionStatus,
    BatchStatus,
    EngineStatus,
    IdentityStatus,
    ModelStatus,
    PromptCacheStatus,
    SeedWorkerStatus,
    WorkerStatus,
    gb,
)
from daemon.engine.sampling import GenerationDefaults, resolve
from daemon.machine import Machine
from daemon.models.identity import Identity, IdentityError, WeightsHasher
from daemon.worker import protocol as p
from daemon.worker.supervisor import State, Supervisor, WorkerConfig, WorkerLost, WorkerStartError
from schemas import bus
from schemas.codes import WorkerState

log = structlog.get_logger("daemon.engine")

# What heartbeats call the supervisor's states.
_WORKER_STATE: dict[State, WorkerState] = {
    "healthy": "healthy",
    "starting": "starting",
    "idle": "idle",
    "restarting": "restarting",
    "dead": "restarting",
    "no_worker": "none",
    "stopping": "stopping",
}


# The worker states seed 001 names, from the supervisor's finer ones.
_HEALTH_STATUS: dict[State, SeedWorkerStatus] = {
    "healthy": "healthy",
    "no_worker": "no_worker",
    "idle": "no_worker",
    "starting": "starting",
    "restarting": "dead",
    "dead": "dead",
    "stopping": "no_worker",
}

_ABSOLUTE_PATH = re.compile(r"(?<![\w/.~])/[^\s'\"():,]+")


def _without_paths(text: str | None, model: LoadedModel | None) -> str | None:
    """A worker crash reason as shown in /admin/status: the model folder named by its id, no other paths."""
    if text is None:
        return None
    if model is not None:
        text = text.replace(str(model.path), model.model_id)
    return _ABSOLUTE_PATH.sub("<path>", text)


class _CancelledWake:
    """Put in a request's queue by its cancel token, to wake the waiting generator."""


@dataclass(frozen=True)
class LoadedModel:
    model_id: str
    path: Path
    tokenizer: Any
    token_text: TokenText
    defaults: GenerationDefaults
    footprint: fit.Footprint
    vocab_size: int


def _vocab_size(path: Path, tokenizer: Any) -> int:
    try:
        config = json.loads((path / "config.json").read_text())
        config = {**config, **(config.get("text_config") or {})}
        return int(config.get("vocab_size") or len(tokenizer))
    except (OSError, ValueError):
        return len(tokenizer)


class WorkerEngine:
    def __init__(
        self,
        *,
        config: WorkerConfig,
        queue_limit: int,
        memory_budget_bytes: int,
        default_model_id: tuple[Path, str] | None = None,
        prepare_helpers: int = 2,
        prepare_timeout_s: float = 1.5,
        hasher: WeightsHasher | None = None,
    ) -> None:
        self.config = config
        self.queue_limit = queue_limit
        self.memory_budget_bytes = memory_budget_bytes
        self._default = default_model_id
        self._model: LoadedModel | None = None
        self._listeners: list[Callable[[], None]] = []
        self.supervisor = Supervisor(config, on_change=self._changed)
        # Chat templates and schema compilation: off the loop, time-limited, at most this many at once.
        self.preparer = PreparePool(
            helpers=prepare_helpers,
            timeout_s=prepare_timeout_s,
            max_waiting=config.slots + queue_limit,
            start_timeout_s=config.start_timeout_s,
            log=log_args(json=config.log_json, level=config.log_level),
        )
        self._tps = 0.0
        self.served = 0
        # The loaded model's identity (daemon/models/identity.py): None while it is being hashed.
        self.hasher = hasher
        self._identity: Identity | None = None
        # Held while a model is loaded or unloaded (see load).
        self._switching = asyncio.Lock()
        self._hashing: asyncio.Task[None] | None = None
        # Bumped by every load and unload: a hash that finishes for an older one is dropped.
        self._generation = 0

    # ---- identity and capacity ---------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @property
    def model_id(self) -> str:
        return self._model.model_id if self._model else ""

    @property
    def context_length(self) -> int:
        return self._model.footprint.context_length if self._model else 0

    @property
    def slots(self) -> int:
        return self.config.slots

    def serves(self, model: str) -> bool:
        return self._model is not None and model == self._model.model_id

    def admission(self) -> fit.Admission | None:
        m = self._model
        if m is None:
            return None
        info = self.supervisor.info
        measured = info.kv_bytes_per_token if info is not None and info.kv_bytes_per_token > 0 else None
        return fit.admission(m.footprint, self.memory_budget_bytes, kv_bytes_per_token=measured)

    def running(self) -> int:
        return min(self.supervisor.in_flight, self.slots)

    def queued(self) -> int:
        return max(0, self.supervisor.in_flight - self.slots)

    def decode_tps(self) -> float:
        return self._tps

    def worker_state(self) -> WorkerState:
        return _WORKER_STATE[self.supervisor.health]

    def structured_output(self) -> bool:
        """The worker built llguidance's tokenizer for this model (kept across idle unloads)."""
        info = self.supervisor.info
        return self._model is not None and info is not None and info.structured_output

    @property
    def identity(self) -> Identity | None:
        """The loaded model's identity once hashed (None while hashing, or with no model)."""
        return self._identity if self._model is not None else None

    def accepting(self) -> bool:
        return self._model is not None and self.supervisor.health in ("healthy", "idle", "starting")

    def capacity(self) -> Capacity:
        m = self._model
        accepting = self.accepting()
        models = []
        if m is not None:
            adm = self.admission()
            models.append(
                bus.ModelInfo(
                    id=m.model_id,
                    context_length=m.footprint.context_length,
                    loaded=self.supervisor.state == "healthy",
                    max_safe_context=adm.max_safe_context if adm else 0,
                    structured_output=self.structured_output(),
                    vocab_size=m.vocab_size,
                    weights_sha256=self._identity.sha256 if self._identity else "",
                )
            )
        return Capacity(
            models=models,
            slots=self.slots,
            running=self.running(),
            # Not accepting (the worker is restarting): no free slot and no queue, so gateways route elsewhere.
            queued=self.queued(),
            queue_limit=self.queue_limit if accepting else 0,
            decode_tps=round(self._tps, 2),
            worker=self.worker_state(),
            accepting=accepting,
        )

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Called whenever the worker's state changes (the daemon heartbeats at once)."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        self._recheck_identity()
        for callback in self._listeners:
            callback()

    # ---- identity ----------------------------------------------------------------------

    def _start_hashing(self, path: Path) -> None:
        if self.hasher is None:
            return
        if self._hashing is not None and not self._hashing.done():
            self._hashing.cancel()
        self._hashing = asyncio.ensure_future(self._hash(self.hasher, path, self._generation))

    async def _hash(self, hasher: WeightsHasher, path: Path, generation: int) -> None:
        try:
            identity = await hasher.identity_async(path)
        except (OSError, IdentityError) as exc:
            # Reported as no identity: the pool routes it only where uncatalogued models are allowed.
            log.warning("weights_identity_failed", error=str(exc)[:300])
            return
        if generation != self._generation:
            return
        changed = self._identity is None or identity.sha256 != self._identity.sha256
        self._identity = identity
        if changed:
            # Tell the pool now, not at the next heartbeat.
            self._changed()

    def _recheck_identity(self) -> None:
        """The worker is reading the loaded model's files again (idle reload, crash restart): so do we.

        The per-file cache makes this a few stats unless a file changed meanwhile.
        """
        m = self._model
        if m is None or self.supervisor.state != "starting" or self.supervisor.model_path != m.path:
            return
        if self._hashing is None or self._hashing.done():
            self._start_hashing(m.path)

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._default is not None:
            path, model_id = self._default
            await self.load(path, model_id)

    def _read_model(self, path: Path, model_id: str | None) -> LoadedModel:
        """Everything the daemon side needs from a model folder (blocking: run in a thread)."""
        path = path.expanduser().resolve()
        if not (path / "config.json").exists():
            raise EngineError("model_not_found", f"{path} is not an mlx-lm model folder (no config.json)")
        if model_id is None:
            model_id = self._default[1] if self._default and self._default[0] == path else path.name
        tokenizer = prompt.load_tokenizer(path)
        return LoadedModel(
            model_id=model_id,
            path=path,
            tokenizer=tokenizer,
            token_text=TokenText(tokenizer),
            defaults=GenerationDefaults.from_model_dir(path),
            footprint=fit.footprint(path),
            vocab_size=_vocab_size(path, tokenizer),
        )

    async def load(self, path: Path, model_id: str | None = None) -> p.Ready:
        """Load `path` (replacing the current model): tokenizer here, weights in a new worker.

        Loads and unloads run one at a time: an owner's /admin/load that comes while the
        start-up load still runs waits for it, instead of the older one's failure handling
        tearing down the newer one's worker and helpers.
        """
        async with self._switching:
            return await self._load(path, model_id)

    async def _load(self, path: Path, model_id: str | None) -> p.Ready:
        loaded = await asyncio.to_thread(self._read_model, path, model_id)
        path = loaded.path
        self._generation += 1
        self._identity = None
        # Hashed while the worker loads the same files (the page cache serves the second reader).
        self._start_hashing(path)
        # The helpers load the tokenizer while the worker loads the weights; a request that comes
        # before they are up waits for them (daemon/engine/prepare_pool.py).
        helpers = asyncio.ensure_future(self.preparer.start(path))
        try:
            info = await self.supervisor.load(path)
        except WorkerStartError as exc:
            helpers.cancel()
            with contextlib.suppress(asyncio.CancelledError, EngineError):
                await helpers
            await self.preparer.stop()
            self._model = None
            self._changed()
            raise EngineError("load_failed", str(exc)) from None
        self._model = loaded
        self._changed()
        try:
            await helpers
        except EngineError as exc:
            await self._unload()
            raise EngineError("load_failed", exc.message) from None
        log.info("model_loaded", model=loaded.model_id, path=str(path), seconds=info.load_s)
        return info

    async def unload(self) -> tuple[str, int]:
        """Stop the worker and forget the model: (model id, resident bytes freed)."""
        if self._model is None:
            raise Unsupported("No model loaded")
        async with self._switching:
            return await self._unload()

    async def _unload(self) -> tuple[str, int]:
        model_id = self.model_id
        self._model = None
        self._generation += 1
        self._identity = None
        if self._hashing is not None:
            self._hashing.cancel()
        await self.preparer.stop()
        freed = await self.supervisor.unload()
        self._changed()
        return model_id, freed

    # ---- what the admin API and the metrics read ------------------------------------------

    async def health(self) -> SeedWorkerStatus:
        status = _HEALTH_STATUS[self.supervisor.health]
        if status == "healthy" and await self.supervisor.ping(timeout=5.0) is None:
            # Alive but not answering: as good as dead for a buyer.
            return "dead"
        return status

    async def status(self) -> EngineStatus:
        sup = self.supervisor
        stats = await sup.ping(timeout=2.0)
        model = self._model
        info = sup.info
        rss = sup.rss()
        identity = self.identity
        adm = self.admission()
        return EngineStatus(
            model=ModelStatus(
                loaded=model is not None and sup.state == "healthy",
                name=model.model_id if model else None,
                idle_unloaded=model is not None and sup.state == "idle",
                memory_gb=gb(stats.memory_active if stats and stats.memory_active else rss),
                weights_gb=gb(info.weights_bytes) if info and model else None,
                structured_output=self.structured_output(),
                identity=msgspec.convert(identity, IdentityStatus, from_attributes=True) if identity else None,
            ),
            worker=WorkerStatus(
                healthy=sup.state == "healthy" and stats is not None,
                status=_HEALTH_STATUS[sup.health],
                state=sup.health,
                pid=sup.pid,
                rss_bytes=rss,
                restarts=sup.restarts,
                last_crash=_without_paths(sup.last_crash, model),
                idle_for_s=round(time.monotonic() - sup.last_active, 1),
            ),
            memory_budget_bytes=self.memory_budget_bytes,
            admission=msgspec.convert(adm, AdmissionStatus, from_attributes=True) if adm else None,
            batch=BatchStatus(
                slots=self.slots,
                active_rows=stats.active if stats else 0,
                waiting=stats.waiting if stats else 0,
                decode_tps=round(self._tps, 2),
                generated_tokens=stats.generated_tokens if stats else 0,
                decode_steps=stats.decode_steps if stats else 0,
                peak_rows=stats.peak_rows if stats else 0,
            ),
            prompt_cache=PromptCacheStatus(
                entries=stats.prompt_cache_entries,
                bytes=stats.prompt_cache_bytes,
                max_bytes=self.config.cache_bytes,
                hits=stats.prompt_cache_hits,
                misses=stats.prompt_cache_misses,
            )
            if stats
            else None,
        )

    def fit(self, machine: Machine) -> dict[str, Any]:
        m = self._model
        if m is None:
            raise Unsupported("No model loaded")
        info = self.supervisor.info
        measured = info.kv_bytes_per_token if info and info.kv_bytes_per_token else None
        report = fit.assess(m.footprint, machine, self.memory_budget_bytes, kv_bytes_per_token=measured)
        return {"model": m.model_id, **report, "measured_decode_tps": self._tps or None}

    async def close(self) -> None:
        if self._hashing is not None:
            self._hashing.cancel()
        if self.hasher is not None:
            self.hasher.close()
        await self.preparer.stop()
        await self.supervisor.close()

    # ---- requests ----------------------------------------------------------------------

    async def prepare(self, request: bus.InferenceRequest) -> Prepared:
        m = self._model
        if m is None or request.model != m.model_id:
            raise EngineError("model_not_loaded", f"{request.model!r} is not loaded here", retryable=True)
        if not self.accepting():
            raise EngineError("worker_restarting", "the provider's inference worker is restarting", retryable=True)
        if self.supervisor.in_flight >= self.slots + self.queue_limit:
            raise EngineError("provider_busy", "the provider's queue is full", retryable=True)
        resolve(request.params, m.defaults, vocab_size=m.vocab_size)
        continued = _check_continuation(request, m)
        schema = structured.schema(request)
        grammar = None
        if schema is not None:
            if not self.structured_output():
                raise EngineError(
                    "unsupported_value",
                    "this provider cannot constrain this model's output to JSON (see its log for why)",
                    param=structured.FORMAT_PARAM,
                )
            grammar = await self.preparer.compile_schema(schema, param=structured.param(request))
        tokens = await self.preparer.render(request)
        if self._model is not m:
            raise EngineError("model_not_loaded", f"{request.model!r} was unloaded meanwhile", retryable=True)
        tokens.extend(continued)
        n = len(tokens)
        if n == 0:
            raise EngineError("invalid_value", "the prompt is empty", param="prompt")
        context = m.footprint.context_length
        if n >= context:
            raise EngineError(
                "context_length_exceeded",
                f"the prompt has {n} tokens; this model's context is {context}",
                param="messages",
            )
        adm = self.admission()
        assert adm is not None
        # A continuation's earlier tokens count against the buyer's max_tokens.
        limit = max(1, request.params.max_tokens - len(continued))
        if n >= adm.max_safe_context or (request.params.max_tokens_explicit and n + limit > adm.max_safe_context):
            raise EngineError(
                "context_over_budget",
                f"prompt ({n} tokens) + max_tokens ({limit}) exceeds this provider's memory budget: "
                f"at most {adm.max_safe_context} tokens fit. Lower max_tokens or shorten the prompt.",
                param="max_tokens",
            )
        return Prepared(
            request=request,
            prompt_tokens=tokens,
            max_tokens=min(limit, adm.max_safe_context - n),
            # Constrained output is JSON from its first token: all answer, no thinking block.
            think=prompt.thinking(m.tokenizer, request, tokens) if grammar is None else None,
            grammar=grammar,
        )

    async def generate(self, prepared: Prepared, cancel: CancelToken) -> AsyncIterator[Event]:
        m = self._model
        request = prepared.request
        if m is None or request.model != m.model_id:
            raise EngineError("model_not_loaded", f"{request.model!r} is not loaded here", retryable=True)
        enqueued = time.monotonic()
        try:
            await self.supervisor.ensure()
        except WorkerStartError as exc:
            raise EngineError("worker_unavailable", str(exc), retryable=True) from None
        if self._model is not m:
            raise EngineError("model_not_loaded", f"{request.model!r} was unloaded", retryable=True)
        sampling = resolve(request.params, m.defaults, vocab_size=m.vocab_size)
        done_before = len(request.continuation.token_ids) if request.continuation else 0
        job = p.Generate(
            id=request.request_id,
            prompt=prepared.prompt_tokens,
            max_tokens=prepared.max_tokens or request.params.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            seed=sampling.seed,
            repetition_penalty=sampling.repetition_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            logit_bias=sampling.logit_bias,
            logprobs=sampling.logprobs,
            grammar=prepared.grammar,
            # The continuation's tokens end the prompt; the grammar must read them first.
            grammar_prefix=done_before if prepared.grammar is not None else 0,
        )
        try:
            queue = self.supervisor.submit(job)
        except WorkerStartError as exc:
            raise EngineError("worker_unavailable", str(exc), retryable=True) from None
        loop = asyncio.get_running_loop()
        wake = _CancelledWake()
        # The token may be cancelled from another thread (or from this loop): hop onto the loop.
        cancel.on_cancel(lambda: loop.call_soon_threadsafe(queue.put_nowait, wake))  # type: ignore[arg-type]
        timer = None
        if request.deadline_ms:
            remaining = request.deadline_ms / 1000 - time.time()
            timer = loop.call_later(max(0.0, remaining), cancel.cancel, "deadline")
        output = Output(
            m.tokenizer,
            stops=request.params.stop,
            tools=prompt.tools_offered(request),
            token_text=m.token_text if sampling.logprobs >= 0 else None,
            continuation=request.continuation,
            think=prepared.think,
        )
        started_at: float | None = None
        first_at: float | None = None
        cached = 0
        finish: bus.FinishReason | None = None
        in_worker = True
        try:
            while finish is None:
                item = await queue.get()
                if isinstance(item, _CancelledWake):
                    finish = "cancelled"
                elif isinstance(item, WorkerLost):
                    in_worker = False
                    raise EngineError("worker_crashed", f"the inference worker stopped: {item.reason}", retryable=True)
                elif isinstance(item, p.Started):
                    started_at = time.monotonic()
                    cached = item.cached_tokens
                elif isinstance(item, p.Ended):
                    in_worker = False
                    if item.reason != "cancelled":
                        raise EngineError("engine_error", f"generation failed: {item.message}")
                    finish = "cancelled"
                else:
                    if first_at is None:
                        first_at = time.monotonic()
                    chunk = output.feed(item)
                    if chunk is not None:
                        yield chunk
                    if item.finish is not None:
                        in_worker = False
                    if output.stopped:
                        finish = "stop"
                    elif item.finish == "length":
                        finish = "length"
                    elif item.finish == "stop":
                        finish = "tool_calls" if output.called_tools else "stop"
            if finish == "cancelled":
                tail = output.cut()
                if tail is not None:
                    yield tail
        finally:
            if timer is not None:
                timer.cancel()
            if in_worker:
                # Stop string, cancel or a consumer that went away: leave the batch now.
                self.supervisor.cancel(request.request_id)
            self.supervisor.release(request.request_id)
        ended = time.monotonic()
        started = started_at or enqueued
        first = first_at or ended
        if output.completion_tokens > 1 and ended > first:
            rate = (output.completion_tokens - 1) / (ended - first)
            self._tps = rate if self._tps == 0 else 0.8 * self._tps + 0.2 * rate
        self.served += 1
        yield Finished(
            finish_reason=finish,
            prompt_tokens=len(prepared.prompt_tokens),
            completion_tokens=output.completion_tokens,
            cached_tokens=cached,
            queue_ms=(started - enqueued) * 1000,
            ttft_ms=(first - started) * 1000,
            generation_ms=(ended - started) * 1000,
            reasoning_tokens=output.reasoning_tokens,
            stop_sequence=output.stop_sequence if finish == "stop" else None,
        )


def _check_continuation(request: bus.InferenceRequest, m: LoadedModel) -> list[int]:
    """The token ids earlier providers generated (relayed by the gateway), or invalid_continuation.

    They go straight to the model's embedding lookup, so each must be a row of it, and
    together they must leave room in the context.
    """
    ids = request.continuation.token_ids if request.continuation is not None else []
    if not ids:
        return []
    context = m.footprint.context_length
    if len(ids) >= context:
        raise EngineError(
            "invalid_continuation", f"the continuation holds {len(ids)} tokens; this model's context is {context}"
        )
    low, high = min(ids), max(ids)
    if low < 0 or high >= m.vocab_size:
        bad = low if low < 0 else high
        raise EngineError(
            "invalid_continuation",
            f"continuation token id {bad} is outside this model's vocabulary (0 to {m.vocab_size - 1})",
        )
    return list(ids)
