"""The worker's generation loop in-process (tiny model): requests arriving together start together."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mlx_lm import load

from daemon.worker import protocol as p
from daemon.worker.runner import Runner

PROMPT = list(range(5, 25))  # 20 tokens


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> Any:
    return load(str(tiny_model_path))[0]


def _first_step_ids(model: Any, *, gather: float, gap_s: float) -> set[str]:
    """Send four requests `gap_s` apart; the ids whose first token came in the first decode step."""
    out: list[Any] = []
    runner = Runner(
        model=model,
        model_key="tiny",
        eos_token_ids=[2],
        vocab_size=256,
        emit=out.append,
        gather=gather,
        gather_max_s=1.0,
    )
    # As if prefill ran at 40 tokens/s: a lone 20-token prompt would take 0.5 s.
    runner.prefill_tps = 40.0
    inbox: queue.Queue[p.ToWorker] = queue.Queue()
    loop = threading.Thread(target=runner.serve, args=(inbox,), daemon=True)
    loop.start()
    try:
        for i in range(4):
            inbox.put(p.Generate(id=f"r{i}", prompt=PROMPT, max_tokens=3))
            time.sleep(gap_s)
        deadline = time.monotonic() + 60
        while sum(isinstance(m, p.Tokens) for m in out) == 0 or runner.by_uid:
            assert time.monotonic() < deadline, "the runner did not finish"
            time.sleep(0.01)
    finally:
        inbox.put(p.Shutdown())
        loop.join(10)
        runner.close()
    first = next(m for m in out if isinstance(m, p.Tokens))
    return {item.id for item in first.items}


def test_requests_arriving_together_are_prefilled_together(model: Any) -> None:
    # 0.1 s apart: all four arrive within the first one's gather window (here 100% of its 0.5 s prefill).
    assert _first_step_ids(model, gather=1.0, gap_s=0.1) == {"r0", "r1", "r2", "r3"}


def test_without_gathering_the_first_request_starts_alone(model: Any) -> None:
    # The control: the same arrivals with gathering off; the first prompt is prefilled before the rest arrive.
    assert _first_step_ids(model, gather=0.0, gap_s=0.1) == {"r0"}


def test_gathering_fades_for_a_one_at_a_time_user_and_returns_for_groups(model: Any) -> None:
    out: list[Any] = []
    runner = Runner(model=model, model_key="tiny", eos_token_ids=[2], vocab_size=256, emit=out.append, gather=0.05)
    inbox: queue.Queue[p.ToWorker] = queue.Queue()
    loop = threading.Thread(target=runner.serve, args=(inbox,), daemon=True)
    loop.start()

    def send(*ids: str) -> None:
        # All at once: the loop sees them in one wake-up however the threads are scheduled.
        with inbox.not_empty:
            inbox.queue.extend(p.Generate(id=request_id, prompt=PROMPT, max_tokens=2) for request_id in ids)
            inbox.not_empty.notify()
        deadline = time.monotonic() + 60
        finished = lambda: {t.id for m in out if isinstance(m, p.Tokens) for t in m.items if t.finish}  # noqa: E731
        while not set(ids) <= finished() or runner.by_uid:
            assert time.monotonic() < deadline, "the runner did not finish"
            time.sleep(0.01)

    try:
        for i in range(3):
            send(f"lone{i}")
        # Each prompt waited and stayed alone: the wait halves each time.
        assert runner.gather_gain == 0.125
        send("a", "b", "c")
        assert runner.gather_gain == 1.0, "requests that came together bring gathering back"
        send("lone3")
        assert runner.gather_gain == 0.5
        # A request arriving while a lone prompt is still expected to be prefilling would have
        # been company: the gain goes back to 1 (then halves, as this one too stayed alone).
        runner._alone_until = time.monotonic() + 60
        send("late")
        assert runner.gather_gain == 0.5, "without the missed-company check it would be 0.25"
    finally:
        inbox.put(p.Shutdown())
        loop.join(10)
        runner.close()


def test_a_slow_schema_builds_off_the_loop_and_the_batch_keeps_decoding(tiny_model_path: Path) -> None:
    from daemon.worker.grammar import grammar_tokenizer
    from schemas import json_grammar

    model, tokenizer = load(str(tiny_model_path))[:2]
    times: list[float] = []
    out: list[Any] = []

    def emit(message: Any) -> None:
        out.append(message)
        if isinstance(message, p.Tokens) and any(item.id == "free" for item in message.items):
            times.append(time.monotonic())

    runner = Runner(
        model=model,
        model_key="tiny",
        eos_token_ids=[2],
        vocab_size=400,
        emit=emit,
        grammar_tokenizer=grammar_tokenizer(tokenizer, 400),
    )
    # Some seconds of llguidance's lexer construction (600 of these took 65 s on this machine).
    slow = {"type": "object", "patternProperties": {f"^p{i}[a-z]+$": {"type": "integer"} for i in range(250)}}
    inbox: queue.Queue[Any] = queue.Queue()
    loop = threading.Thread(target=runner.serve, args=(inbox,), daemon=True)
    loop.start()
    try:
        inbox.put(p.Generate(id="free", prompt=PROMPT, max_tokens=100_000))
        deadline = time.monotonic() + 30
        while not times:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        asked = time.monotonic()
        inbox.put(p.Generate(id="json", prompt=PROMPT, max_tokens=4, grammar=json_grammar.grammar_of(slow)))
        while not any(isinstance(m, p.Tokens) and any(i.id == "json" for i in m.items) for m in out):
            assert time.monotonic() < asked + 120, "the constrained request never started"
            time.sleep(0.01)
        started = time.monotonic()
        inbox.put(p.Cancel(id="free"))
    finally:
        inbox.put(p.Shutdown())
        loop.join(10)
        runner.close()
    during = [t for t in times if asked <= t <= started]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert started - asked > 0.5, "the schema was meant to take a while to build"
    # The unconstrained sequence kept decoding while the matcher was built.
    assert len(during) > 10
    assert max(gaps) < 0.5, max(gaps)
