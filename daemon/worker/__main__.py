"""`python -m daemon.worker`: the inference worker process the daemon supervises.

It loads one model, says Ready, then runs the batch until told to shut down or
until its stdin closes (the daemon died: an orphaned worker must not keep a
Mac's memory). Killing this process is how the daemon returns every byte of
the model to the system.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import structlog

from daemon.child import add_log_args, become_child
from daemon.worker import protocol as p

log = structlog.get_logger("daemon.worker")


class Writer:
    """Frames to the daemon; the loop thread and the reader thread (pongs) both write."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        data = p.frame(message)
        with self._lock:
            self._out.write(data)
            self._out.flush()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any, p.Ready]:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from daemon.worker.grammar import grammar_tokenizer

    started = time.monotonic()
    model, tokenizer = load(str(args.model_path))[:2]
    params: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    weights = sum(v.nbytes for _, v in params)
    cache = make_prompt_cache(model)
    batchable = all(hasattr(c, "merge") for c in cache)
    # One forward pass: compiles mlx's CPU kernels now, not on a buyer's request, and
    # gives a real cache to measure what a token of context costs.
    model(mx.array([[1, 2, 3]]), cache=cache)
    mx.eval([c.state for c in cache])
    kv_per_token = 0
    for c in cache:
        keys, values = getattr(c, "keys", None), getattr(c, "values", None)
        if isinstance(keys, mx.array) and isinstance(values, mx.array):
            kv_per_token += keys.shape[1] * keys.shape[3] * keys.dtype.size
            kv_per_token += values.shape[1] * values.shape[3] * values.dtype.size
    del cache
    mx.clear_cache()
    grammar = grammar_tokenizer(tokenizer, _vocab_size(model, tokenizer))
    ready = p.Ready(
        pid=os.getpid(),
        load_s=round(time.monotonic() - started, 3),
        weights_bytes=int(weights),
        kv_bytes_per_token=int(kv_per_token),
        batchable=batchable,
        structured_output=grammar is not None,
    )
    return model, tokenizer, grammar, ready


def _vocab_size(model: Any, tokenizer: Any) -> int:
    """Width of the model's logits (may exceed the tokenizer's vocabulary)."""
    return int(getattr(model.args, "vocab_size", 0) or len(tokenizer))


def _warm_up(runner: Any) -> None:
    """Short requests through the batch path itself (its kernels compile on first use)."""
    sink: list[Any] = []
    runner.emit, emit = sink.append, runner.emit
    try:
        runner.submit(p.Generate(id="warm-up", prompt=[1, 2, 3, 4], max_tokens=2))
        if runner.grammar_tokenizer is not None:
            from llguidance import LLMatcher

            # And a constrained row beside it: the masked path must not be slow on a buyer's request.
            grammar = LLMatcher.grammar_from_json_schema({"type": "object"})
            runner.submit(p.Generate(id="warm-up-json", prompt=[1, 2, 3, 5], max_tokens=2, grammar=grammar))
        while runner.by_uid:
            runner.step()
    finally:
        runner.emit = emit
    runner.prompt_cache.trim_to(n_sequences=0)
    runner.counters.hits = runner.counters.misses = runner.counters.generated = 0


def _read_loop(stream: BinaryIO, inbox: queue.Queue[p.ToWorker], writer: Writer, runner: Any) -> None:
    try:
        while (body := p.read_frame(stream)) is not None:
            message = p.TO_WORKER.decode(body)
            if isinstance(message, p.Ping):
                # Answered here, not by the busy loop: the daemon asks whether we are alive.
                stats = runner.stats()
                writer.send(p.Pong(nonce=message.nonce, stats=msgspec.structs.replace(stats, rss=_rss_bytes())))
            else:
                inbox.put(message)
    except Exception:
        log.exception("worker_read_failed")
    # The daemon closed the pipe (or died): stop.
    inbox.put(p.Shutdown())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.worker")
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--prefill-step", type=int, default=512)
    parser.add_argument("--prefill-gather", type=float, default=0.05)
    parser.add_argument("--cache-entries", type=int, default=16)
    parser.add_argument("--cache-bytes", type=int, default=1 << 30)
    add_log_args(parser)
    args = parser.parse_args(argv)

    # Protocol frames go to a private stdout. The daemon stops us with a Shutdown message, or
    # SIGKILL; if it dies, our stdin closes and we exit.
    out = become_child(args)
    structlog.contextvars.bind_contextvars(worker_pid=os.getpid())
    writer = Writer(out)

    try:
        model, tokenizer, grammar, ready = _load(args)
        from daemon.worker.runner import Runner

        runner = Runner(
            model=model,
            model_key=str(args.model_path),
            eos_token_ids=sorted(tokenizer.eos_token_ids),
            vocab_size=_vocab_size(model, tokenizer),
            emit=writer.send,
            slots=args.slots,
            prefill_step=args.prefill_step,
            gather=args.prefill_gather,
            cache_entries=args.cache_entries,
            cache_bytes=args.cache_bytes,
            grammar_tokenizer=grammar,
        )
        _warm_up(runner)
    except Exception as exc:
        log.exception("worker_load_failed", model_path=str(args.model_path))
        writer.send(p.LoadFailed(message=f"{type(exc).__name__}: {exc}"))
        return 1
    log.info(
        "worker_ready",
        model_path=str(args.model_path),
        load_s=ready.load_s,
        weights_mb=round(ready.weights_bytes / 1e6, 1),
        kv_bytes_per_token=ready.kv_bytes_per_token,
        structured_output=ready.structured_output,
    )
    writer.send(ready)

    inbox: queue.Queue[p.ToWorker] = queue.Queue()
    reader = threading.Thread(
        target=_read_loop, args=(sys.stdin.buffer, inbox, writer, runner), name="worker-reader", daemon=True
    )
    reader.start()
    try:
        runner.serve(inbox)
    finally:
        runner.close()
    log.info("worker_exit")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Skip interpreter finalization: the reader thread is blocked on stdin, and tearing down
    # MLX's buffers one by one is slower than letting the OS take the whole address space back.
    os._exit(code)
