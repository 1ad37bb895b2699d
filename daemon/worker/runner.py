"""The worker's generation loop: one BatchGenerator, one LRU prompt cache, one thread.

Requests join the running batch as they arrive (continuous batching) and leave
it the moment they finish or are cancelled. Before a prompt is processed the
prompt cache is searched for the longest reusable prefix (a multi-turn
conversation re-sends everything said so far); finished and cancelled
sequences put their KV cache back for the next turn.

A JSON-constrained request's grammar matcher is built on a helper thread
(llguidance drops the GIL while it builds): a schema that takes a second to
build must not stall every other sequence in the batch for that second. The
request joins the batch when its matcher is ready.
"""

from __future__ import annotations

import math
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import structlog
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from daemon.worker import protocol as p
from daemon.worker.grammar import Constraint, GrammarError
from daemon.worker.sampling import make_processors, make_sampler

log = structlog.get_logger("daemon.worker")

Emit = Callable[[Any], None]


@dataclass
class _Sequence:
    job: p.Generate
    uid: int
    cached_tokens: int
    started: bool = False
    generated: int = 0
    constraint: Constraint | None = None


@dataclass(frozen=True)
class _Built:
    """A constrained request whose matcher was built off the loop (or failed to be)."""

    job: p.Generate
    future: Future[Constraint | None]


@dataclass(frozen=True)
class _Deliver:
    """Puts a finished build back on the loop's inbox."""

    job: p.Generate
    inbox: queue.Queue[Any]

    def __call__(self, future: Future[Constraint | None]) -> None:
        self.inbox.put(_Built(self.job, future))


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    generated: int = 0
    steps: int = 0
    # Steps that decoded at least one token, and the most sequences one step decoded: the facts
    # that show continuous batching at work (tests and operators read them, not wall-clock ratios).
    decode_steps: int = 0
    peak_rows: int = 0


@dataclass
class Runner:
    model: Any
    model_key: str
    eos_token_ids: list[int]
    vocab_size: int
    emit: Emit
    slots: int = 4
    prefill_step: int = 512
    cache_entries: int = 16
    cache_bytes: int = 1 << 30
    # A prompt that arrives alone waits up to this share of its own expected prefill time for
    # company (see `serve`); 0 turns gathering off.
    gather: float = 0.05
    gather_max_s: float = 0.05
    # llguidance's tokenizer for this model (daemon/worker/grammar.py); None: cannot constrain.
    grammar_tokenizer: Any = None
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        self.generator = BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in self.eos_token_ids],
            completion_batch_size=self.slots,
            prefill_batch_size=min(self.slots, 8),
            prefill_step_size=self.prefill_step,
        )
        self.prompt_cache = LRUPromptCache(max_size=self.cache_entries, max_bytes=self.cache_bytes)
        self.by_uid: dict[int, _Sequence] = {}
        self.by_id: dict[str, _Sequence] = {}
        # Measured prefill speed (tokens/s, moving average); seeded by the warm-up.
        self.prefill_tps = 0.0
        # How much gathering pays here lately: 1 when requests come in groups, halved each
        # time a prompt waited and stayed alone, so a one-at-a-time user stops paying for it.
        self.gather_gain = 1.0
        # Until when the last prompt that started alone is expected to be prefilling.
        self._alone_until = 0.0
        # Constrained requests whose matcher is being built, and those cancelled meanwhile.
        self._building: set[str] = set()
        self._cancelled_builds: set[str] = set()
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="grammar")

    # ---- the loop --------------------------------------------------------------------

    def serve(self, inbox: queue.Queue[Any]) -> None:
        """Until Shutdown: take messages, then advance the batch one step.

        Requests that arrive together should be prefilled together: a prefill cannot be
        joined once it runs, so one started for the first of eight simultaneous requests
        makes the other seven wait through it. The daemon hands them over a few ms apart
        (each is parsed and tokenized in turn), so a new prompt waits briefly for company
        before its prefill starts: at most `gather` of that prefill's expected time, which
        is what a request that really comes alone pays, and less (`gather_gain`) where
        requests have lately been coming one at a time.
        """
        while True:
            fresh: list[int] = []
            try:
                # Idle: block for work. Busy: only take what has already arrived.
                message = inbox.get(block=not self.by_uid)
                deadline: float | None = None
                while True:
                    if isinstance(message, p.Shutdown):
                        self._builder.shutdown(wait=False, cancel_futures=True)
                        return
                    tokens = self.handle(message, inbox)
                    if tokens:
                        fresh.append(tokens)
                        now = time.monotonic()
                        if now < self._alone_until:
                            # Company came just after a prompt started alone: gathering would have paid.
                            self.gather_gain = 1.0
                        if deadline is None:
                            deadline = now + self.gather_window(tokens)
                    remaining = deadline - time.monotonic() if deadline is not None else 0.0
                    message = inbox.get(timeout=remaining) if remaining > 0 else inbox.get_nowait()
            except queue.Empty:
                pass
            if len(fresh) == 1:
                self.gather_gain *= 0.5
                if self.prefill_tps > 0:
                    self._alone_until = time.monotonic() + fresh[0] / self.prefill_tps
            elif fresh:
                self.gather_gain = 1.0
            if self.by_uid:
                self.step()

    def gather_window(self, prompt_tokens: int) -> float:
        if self.gather <= 0 or self.prefill_tps <= 0:
            return 0.0
        return min(self.gather_max_s, self.gather * self.gather_gain * prompt_tokens / self.prefill_tps)

    def handle(self, message: p.ToWorker | _Built, inbox: queue.Queue[Any] | None = None) -> int:
        """Act on a message; returns how many prompt tokens a new request will prefill."""
        if isinstance(message, p.Generate) and message.grammar is not None and inbox is not None:
            self._building.add(message.id)
            future = self._builder.submit(self._constraint, message)
            future.add_done_callback(_Deliver(message, inbox))
        elif isinstance(message, (p.Generate, _Built)):
            job = message if isinstance(message, p.Generate) else message.job
            try:
                if isinstance(message, p.Generate):
                    return self.submit(job)
                self._building.discard(job.id)
                if job.id in self._cancelled_builds:
                    self._cancelled_builds.discard(job.id)
                    return 0
                return self.submit(job, message.future.result())
            except Exception as exc:
                log.exception("submit_failed", request_id=job.id)
                self.emit(p.Ended(id=job.id, reason="error", message=f"{type(exc).__name__}: {exc}"))
        elif isinstance(message, p.Cancel):
            self.cancel(message.id)
        return 0

    # ---- requests --------------------------------------------------------------------

    def submit(self, job: p.Generate, constraint: Constraint | None = None) -> int:
        """Add a request to the batch; returns the prompt tokens left to prefill (after the cache)."""
        prompt = job.prompt
        if constraint is None:
            constraint = self._constraint(job)
        cache, rest = self.prompt_cache.fetch_nearest_cache(self.model_key, prompt)
        if cache is not None and not rest:
            # The whole prompt is cached: recompute its last token, which starts generation.
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
            else:
                cache, rest = None, prompt
        cached = len(prompt) - len(rest)
        if cached:
            self.counters.hits += 1
        else:
            self.counters.misses += 1
        (uid,) = self.generator.insert(
            [list(rest)],
            max_tokens=[job.max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[list(prompt[:cached])],
            samplers=[make_sampler(job, self.vocab_size)],
            logits_processors=[make_processors(job, constraint)],
        )
        seq = _Sequence(job=job, uid=uid, cached_tokens=cached, constraint=constraint)
        self.by_uid[uid] = seq
        self.by_id[job.id] = seq
        return len(rest)

    def _constraint(self, job: p.Generate) -> Constraint | None:
        if job.grammar is None:
            return None
        if self.grammar_tokenizer is None:
            # The daemon checks Ready.structured_output first; never generate unconstrained text instead.
            raise GrammarError("this worker cannot constrain output (llguidance is unavailable)")
        prefix = job.prompt[len(job.prompt) - job.grammar_prefix :] if job.grammar_prefix else []
        return Constraint(self.grammar_tokenizer, job.grammar, prefix)

    def cancel(self, request_id: str) -> None:
        if request_id in self._building:
            self._cancelled_builds.add(request_id)
            return
        seq = self.by_id.get(request_id)
        if seq is None:
            return
        caches = self.generator.remove([seq.uid], return_prompt_caches=True)
        self._forget(seq)
        for cache, tokens in caches.values():
            # What was computed so far still serves the next turn of this conversation.
            if tokens and cache:
                self.prompt_cache.insert_cache(self.model_key, list(tokens), cache, cache_type="assistant")
        self.emit(p.Ended(id=request_id, reason="cancelled"))

    def _forget(self, seq: _Sequence) -> None:
        self.by_uid.pop(seq.uid, None)
        self.by_id.pop(seq.job.id, None)

    # ---- one step --------------------------------------------------------------------

    def step(self) -> None:
        with self.generator.stats() as work:
            prompt_responses, gen_responses = self.generator.next()
        self.counters.steps += 1
        if work.prompt_tokens and work.prompt_time > 0:
            rate = work.prompt_tokens / work.prompt_time
            self.prefill_tps = rate if not self.prefill_tps else 0.7 * self.prefill_tps + 0.3 * rate
        for r in prompt_responses:
            seq = self.by_uid.get(r.uid)
            if seq is not None and not seq.started:
                seq.started = True
                self.emit(p.Started(id=seq.job.id, cached_tokens=seq.cached_tokens))
        if not gen_responses:
            return
        self.counters.decode_steps += 1
        self.counters.peak_rows = max(self.counters.peak_rows, len(gen_responses))
        items: list[p.Token] = []
        for r in gen_responses:
            seq = self.by_uid.get(r.uid)
            if seq is None:
                continue
            if not seq.started:
                seq.started = True
                self.emit(p.Started(id=seq.job.id, cached_tokens=seq.cached_tokens))
            if seq.constraint is not None and seq.constraint.error:
                # This token broke the grammar (an llguidance limit, not a sampling choice):
                # fail the request rather than let invalid JSON pass as constrained output.
                self.generator.remove([seq.uid])
                self._forget(seq)
                message = f"the output no longer fits response_format: {seq.constraint.error}"
                self.emit(p.Ended(id=seq.job.id, reason="error", message=message))
                continue
            seq.generated += 1
            self.counters.generated += 1
            logprob, top = self._logprobs(seq.job.logprobs, r.logprobs, r.token)
            items.append(p.Token(id=seq.job.id, token=r.token, finish=r.finish_reason, logprob=logprob, top=top))
            if r.finish_reason is not None:
                self._forget(seq)
                if r.prompt_cache is not None and r.all_tokens:
                    self.prompt_cache.insert_cache(
                        self.model_key, list(r.all_tokens), r.prompt_cache, cache_type="assistant"
                    )
        self.emit(p.Tokens(items=items))

    @staticmethod
    def _logprobs(want: int, logprobs: mx.array, token: int) -> tuple[float | None, list[tuple[int, float]] | None]:
        if want < 0:
            return None, None
        chosen: float = logprobs[token].item()  # type: ignore[assignment]
        if want == 0:
            return chosen, None
        top_ids = mx.argpartition(-logprobs, kth=want - 1)[:want]
        values = logprobs[top_ids]
        order = mx.argsort(-values)
        ids: list[int] = top_ids[order].tolist()  # type: ignore[assignment]
        vals: list[float] = values[order].tolist()  # type: ignore[assignment]
        # Tokens a grammar forbids (-inf) are no alternatives: fewer than `want` remain then.
        return chosen, [(i, v) for i, v in zip(ids, vals, strict=True) if v != -math.inf]

    # ---- introspection ---------------------------------------------------------------

    def stats(self) -> p.Stats:
        # Called from the pipe-reader thread: copy before iterating, the loop may be changing it.
        sequences = list(self.by_id.values())
        active = sum(1 for s in sequences if s.started)
        return p.Stats(
            active=active,
            waiting=len(sequences) - active,
            memory_active=mx.get_active_memory(),
            memory_peak=mx.get_peak_memory(),
            memory_cache=mx.get_cache_memory(),
            prompt_cache_entries=len(self.prompt_cache),
            prompt_cache_bytes=self.prompt_cache.nbytes,
            prompt_cache_hits=self.counters.hits,
            prompt_cache_misses=self.counters.misses,
            generated_tokens=self.counters.generated,
            steps=self.counters.steps,
            decode_steps=self.counters.decode_steps,
            peak_rows=self.counters.peak_rows,
        )

    def close(self) -> None:
        self._builder.shutdown(wait=False, cancel_futures=True)
        self.generator.close()
