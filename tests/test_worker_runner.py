"""The worker's generation loop in-process (tiny model): requests arriving together start together."""

from __future__ import annotations

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
