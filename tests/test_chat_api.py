"""The chat completions surface, end to end through gateway → NATS → daemon (tiny model)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from mlx_lm import load, stream_generate

from tests.support import logs
from tests.support.stack import TINY_MODEL, Stack

HELLO = [{"role": "user", "content": "Hello, how are you?"}]


def _chat(stack: Stack, **body: object) -> httpx.Response:
    payload = {"model": TINY_MODEL, "messages": HELLO, "temperature": 0, **body}
    return httpx.post(f"{stack.v1}/chat/completions", json=payload, headers=stack.auth(), timeout=60)


def _sse_events(response: httpx.Response) -> list[str]:
    """The data payloads of an SSE body, checking OpenAI's framing on the way."""
    raw = response.text
    assert raw.endswith("\n\n"), "every event ends with a blank line"
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        assert "\n" not in block, "one data line per event"
        events.append(block.removeprefix("data: "))
    return events


def _reference_text(stack: Stack, max_tokens: int) -> str:
    """What the model says greedily, computed here with mlx-lm, independent of our stack."""
    model, tokenizer = load(str(stack.model_path))[:2]
    prompt = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))


def test_non_stream_completion_shape_and_usage(stack: Stack) -> None:
    r = _chat(stack, max_tokens=12)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"] == f"chatcmpl-{r.headers['x-request-id']}"
    assert body["model"] == TINY_MODEL
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == _reference_text(stack, 12)
    usage = body["usage"]
    assert usage["completion_tokens"] == 12
    # ChatML around "Hello, how are you?" plus the generation prompt: more tokens than words.
    assert usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12


def test_a_whole_answer_arrives_in_few_frames_and_the_same_text(stack: Stack) -> None:
    # A non-stream buyer sees nothing before the end: the daemon gathers its tokens into a frame per
    # MP_NONSTREAM_FRAME_MS (50 ms) instead of one per token, and the text is what the model wrote.
    r = _chat(stack, max_tokens=64)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == _reference_text(stack, 64)
    line = logs.wait_event(stack.gateway.log_path, "chat_completion", request_id=r.headers["x-request-id"])
    assert line["completion_tokens"] == "64"
    assert 1 <= int(line["frames"]) <= 16, line


def test_the_summary_line_tells_where_the_time_to_first_token_went(stack: Stack) -> None:
    payload = {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 8, "stream": True}
    sent = time.monotonic()
    with httpx.stream("POST", f"{stack.v1}/chat/completions", json=payload, headers=stack.auth(), timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if '"content":"' in line and '"content":""' not in line)
        first_at = time.monotonic()
        assert first.startswith("data: ")
        assert list(lines)[-2:] == ["data: [DONE]", ""]
    line = logs.wait_event(stack.gateway.log_path, "chat_completion", request_id=r.headers["x-request-id"])
    dispatch, accept, ttft = (float(line[k]) for k in ("dispatch_ms", "accept_ms", "ttft_ms"))
    # Ours (auth, body, quota), then NATS and the provider's acceptance, then its first token: in that order,
    # all inside what the buyer waited for the first text.
    assert 0 < dispatch < ttft, line
    assert 0 < accept < ttft, line
    assert dispatch + accept <= ttft <= float(line["duration_ms"]), line
    assert ttft < (first_at - sent) * 1000, line


def test_stream_framing_matches_openai(stack: Stack) -> None:
    r = _chat(stack, max_tokens=40, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "server" not in r.headers, "the server's software is not advertised"
    events = _sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    ids = {c["id"] for c in chunks}
    assert ids == {f"chatcmpl-{r.headers['x-request-id']}"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    body, finish, usage = chunks[1:-2], chunks[-2], chunks[-1]
    assert all(c["choices"][0]["finish_reason"] is None for c in body)
    assert all("role" not in c["choices"][0]["delta"] for c in body)
    assert finish["choices"][0]["finish_reason"] == "length"
    assert finish["choices"][0]["delta"] == {}
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 40
    text = "".join(c["choices"][0]["delta"]["content"] for c in body)
    # Same greedy tokens as an independent mlx-lm run, and no delta cut a character in two:
    # a split would show up as extra U+FFFD or a lone surrogate in some delta.
    assert text == _reference_text(stack, 40)
    for c in body:
        c["choices"][0]["delta"]["content"].encode("utf-8")


def test_stream_without_usage_has_no_usage_chunk(stack: Stack) -> None:
    chunks = [json.loads(e) for e in _sse_events(_chat(stack, max_tokens=5, stream=True))[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_multibyte_text_is_never_split(stack: Stack) -> None:
    # Enough tokens that the random model emits byte-level pieces of CJK and emoji.
    r = _chat(stack, max_tokens=200, stream=True, messages=[{"role": "user", "content": "日本 🙂 東京"}])
    deltas = [json.loads(e)["choices"][0]["delta"].get("content") for e in _sse_events(r)[1:-2]]
    full = _chat(stack, max_tokens=200, messages=[{"role": "user", "content": "日本 🙂 東京"}]).json()
    text = "".join(d for d in deltas if d)
    assert text == full["choices"][0]["message"]["content"]
    # Each delta decodes on its own exactly as it does inside the whole text.
    assert sum(d.count("\ufffd") for d in deltas if d) == text.count("\ufffd")


def test_stop_sequence_ends_generation_and_is_never_sent(stack: Stack) -> None:
    free = _chat(stack, max_tokens=30).json()["choices"][0]["message"]["content"]
    # A stop string from the middle of the greedy answer, spanning whatever tokens it spans.
    stop = free[10:14]
    assert len(stop.strip()) >= 2, free
    expected = free[: free.index(stop)]
    r = _chat(stack, max_tokens=30, stop=[stop])
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == expected
    events = _sse_events(_chat(stack, max_tokens=30, stop=stop, stream=True))
    streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[1:-1])
    assert streamed == expected
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"


def test_max_completion_tokens_wins_over_max_tokens(stack: Stack) -> None:
    r = _chat(stack, max_tokens=20, max_completion_tokens=3)
    assert r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("seed", [1, 2])
def test_sampling_with_seed_is_reproducible(stack: Stack, seed: int) -> None:
    a = _chat(stack, max_tokens=16, temperature=1.0, top_p=0.9, seed=seed).json()
    b = _chat(stack, max_tokens=16, temperature=1.0, top_p=0.9, seed=seed).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_models_and_status(stack: Stack) -> None:
    models = httpx.get(f"{stack.v1}/models", headers=stack.auth()).json()
    assert models["object"] == "list"
    assert TINY_MODEL in [m["id"] for m in models["data"]]
    status = httpx.get(f"{stack.v1}/status").json()  # public: no key
    assert status["status"] == "available"
    (tiny,) = [m for m in status["models"] if m["id"] == TINY_MODEL]
    assert tiny["providers"] >= 1
    assert tiny["slots"] >= 1
    assert status["capacity"]["providers"] >= 1
    assert any("plaintext" in d for d in status["disclosures"])
    health = httpx.get(f"{stack.base_url}/health")
    assert health.status_code == 200
    assert health.json()["database"] is True
    assert health.json()["nats"] is True


def test_every_response_has_a_request_id(stack: Stack) -> None:
    for r in (httpx.get(f"{stack.v1}/status"), httpx.get(f"{stack.v1}/nope"), _chat(stack, max_tokens=1)):
        assert len(r.headers["x-request-id"]) == 24
