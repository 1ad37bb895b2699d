"""A few truths on the real SmolLM2: the second turn reuses the prompt cache, batching pays off."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from daemon.models.smollm2 import ensure_smollm2
from infra.components import DaemonChild
from tests.support.daemons import daemon_in_pool, status
from tests.support.stack import Stack

pytestmark = pytest.mark.smollm2

MODEL = "SmolLM2-135M-Instruct-batch"


@pytest.fixture(scope="module")
def smollm2(stack: Stack, model_cache: Path) -> Iterator[DaemonChild]:
    folder = ensure_smollm2(model_cache / "models")
    with daemon_in_pool(stack, provider_id="smollm2-batch-mac", model_id=MODEL, model_path=folder) as d:
        yield d


def test_second_turn_reuses_the_prompt_cache_through_the_pool(smollm2: DaemonChild, stack: Stack) -> None:
    client = OpenAI(base_url=stack.v1, api_key=stack.api_key, max_retries=0, timeout=120)
    turn: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
    first = client.chat.completions.create(model=MODEL, messages=turn, temperature=0, max_tokens=32)
    answer = first.choices[0].message.content or ""
    assert "Paris" in answer
    turn += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Germany?"}]
    second = client.chat.completions.create(model=MODEL, messages=turn, temperature=0, max_tokens=32)
    assert "Berlin" in (second.choices[0].message.content or "")
    assert first.usage is not None
    assert second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None
    assert details.cached_tokens is not None
    # Everything of the first turn (prompt and answer) came from the cache.
    assert details.cached_tokens >= first.usage.prompt_tokens + first.usage.completion_tokens
    assert details.cached_tokens < second.usage.prompt_tokens
    print(f"\nSmolLM2 second turn: {details.cached_tokens} of {second.usage.prompt_tokens} prompt tokens cached")


PROMPTS = ["Write a story about a dragon.", "Explain photosynthesis.", "Describe Paris.", "Tell me about the ocean."]


async def _ask(client: httpx.AsyncClient, daemon: DaemonChild, prompt: str, tokens: int) -> dict[str, Any]:
    body = {"model": "x", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0}
    r = await client.post(f"{daemon.api_url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def test_four_concurrent_requests_decode_together(smollm2: DaemonChild) -> None:
    tokens = 40
    async with httpx.AsyncClient(timeout=300) as client:
        await _ask(client, smollm2, "Hi", 2)
        alone = [await _ask(client, smollm2, p, tokens) for p in PROMPTS]
        before = (await asyncio.to_thread(status, smollm2))["batch"]
        started = time.monotonic()
        together = await asyncio.gather(*(_ask(client, smollm2, p, tokens) for p in PROMPTS))
        concurrent_s = time.monotonic() - started
        after = (await asyncio.to_thread(status, smollm2))["batch"]
    assert [r["choices"][0]["message"]["content"] for r in together] == [
        r["choices"][0]["message"]["content"] for r in alone
    ]
    generated = sum(r["usage"]["completion_tokens"] for r in together)
    # The worker's own record: the four answers shared decode steps, all four rows in one step at the peak.
    steps = after["decode_steps"] - before["decode_steps"]
    assert after["generated_tokens"] - before["generated_tokens"] == generated
    assert steps < generated / 2, (steps, generated)
    assert after["peak_rows"] == len(PROMPTS)
    print(f"\nSmolLM2 4 x {tokens} tokens together: {steps} decode steps, {generated / concurrent_s:.1f} tokens/s")
