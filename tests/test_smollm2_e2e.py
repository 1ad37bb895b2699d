"""The real SmolLM2-135M-Instruct through the whole path, driven by the official OpenAI SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from daemon.models.smollm2 import MODEL_ID, ensure_smollm2
from infra.components import Child
from tests.support.daemons import daemon_in_pool
from tests.support.stack import Stack

pytestmark = pytest.mark.smollm2

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(stack: Stack, model_cache: Path) -> Iterator[Child]:
    folder = ensure_smollm2(model_cache / "models")
    with daemon_in_pool(stack, provider_id="smollm2-mac", model_id=MODEL_ID, model_path=folder, timeout=300) as daemon:
        yield daemon


@pytest.fixture
def client(stack: Stack) -> OpenAI:
    return OpenAI(base_url=stack.v1, api_key=stack.api_key, max_retries=0, timeout=120)


def test_paris_non_stream(smollm2: Child, client: OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, temperature=0, max_tokens=32)
    answer = resp.choices[0].message.content or ""
    assert "Paris" in answer, answer
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 7  # "The capital of France is Paris."
    assert resp.usage.prompt_tokens > 20  # SmolLM2's template adds its own system prompt


def test_paris_stream(smollm2: Child, client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=QUESTION,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris."
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7


def test_model_is_listed(smollm2: Child, client: OpenAI) -> None:
    assert MODEL_ID in [m.id for m in client.models.list()]


class Capital(pydantic.BaseModel):
    country: str
    city: str


def test_json_schema_answer_is_a_sensible_object(smollm2: Child, client: OpenAI) -> None:
    resp = client.chat.completions.parse(
        model=MODEL_ID, messages=QUESTION, temperature=0, max_tokens=40, response_format=Capital
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert choice.message.parsed is not None
    assert choice.message.parsed.city == "Paris", choice.message.content
    assert choice.message.parsed.country.lower() == "france", choice.message.content
