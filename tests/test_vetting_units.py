"""The gateway's checks on what providers send, in-process (services/gateway/vetting.py, replies.py)."""

from __future__ import annotations

import msgspec
import pytest

from schemas import bus
from services.gateway import vetting
from services.gateway.json_check import JsonChecks
from services.gateway.replies import MAX_FRAME_BYTES, ReplyStream, StreamBroken

# Pure: no server, no process, no network (`just test -m unit`).
pytestmark = pytest.mark.unit


def _request(**fields: object) -> bus.InferenceRequest:
    base: dict[str, object] = {
        "request_id": "r1",
        "model": "m",
        "messages": [bus.BusMessage("user", "Hello there")],
        "params": bus.SamplingParams(max_tokens=4),
    }
    return bus.InferenceRequest(**{**base, **fields})  # type: ignore[arg-type]


def test_the_prompt_ceiling_covers_an_honest_count_and_not_a_lie() -> None:
    req = _request()
    ceiling = vetting.prompt_token_ceiling(req)
    # Every BPE token covers at least a byte; the template adds a bounded amount.
    assert len(b"Hello there") < ceiling < 10_000
    continued = msgspec.structs.replace(req, continuation=bus.Continuation(token_ids=[1] * 500, text="x"))
    assert vetting.prompt_token_ceiling(continued) == ceiling + 500
    check = vetting.LegCheck(req, 0, frozenset())
    check.accepted(bus.Accepted(seq=0, prompt_tokens=ceiling))
    with pytest.raises(vetting.Violation) as lie:
        check.accepted(bus.Accepted(seq=0, prompt_tokens=ceiling + 1))
    assert lie.value.kind == "prompt_tokens_inflated"


def test_offered_tools_follow_tool_choice() -> None:
    tools = [{"type": "function", "function": {"name": n}} for n in ("a", "b")]
    assert vetting.offered_tools(_request(tools=tools)) == {"a", "b"}
    assert vetting.offered_tools(_request(tools=tools, tool_choice="none")) == set()
    assert vetting.offered_tools(_request(tools=tools, tool_choice={"function": {"name": "b"}})) == {"b"}
    assert vetting.offered_tools(_request()) == set()


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        (bus.Delta(seq=1, text="a", tokens=2, token_ids=[1]), "token_count_mismatch"),
        (bus.Delta(seq=1, text="a", tokens=5, token_ids=[1] * 5), "too_many_tokens"),
        (bus.Delta(seq=1, text="a", tokens=1, token_ids=[100]), "token_id_out_of_range"),
        (
            bus.Delta(seq=1, text="", tokens=1, token_ids=[1], tool_calls=[bus.ToolCall("i", "x", "{}")]),
            "unoffered_tool_call",
        ),
        (
            bus.Delta(seq=1, text="a", tokens=1, token_ids=[1], logprobs=[bus.TokenLogprob("a", -1.0)]),
            "unrequested_logprobs",
        ),
        (bus.Delta(seq=1, text="a" * 20_000, tokens=1, token_ids=[1]), "oversized_text"),
    ],
)
def test_each_lie_in_a_delta_is_a_violation(frame: bus.Delta, kind: str) -> None:
    check = vetting.LegCheck(_request(), 100, frozenset())
    with pytest.raises(vetting.Violation) as caught:
        check.delta(frame)
    assert caught.value.kind == kind
    assert check.tokens == 0, "nothing of a refused frame is counted"


def test_an_honest_leg_is_billed_by_its_ids_and_its_done_made_consistent() -> None:
    check = vetting.LegCheck(_request(), 100, frozenset())
    check.delta(bus.Delta(seq=1, text="He", tokens=2, token_ids=[4, 5]))
    check.delta(bus.Delta(seq=2, text="", tokens=1, token_ids=[6]))
    done = check.done(
        bus.Done(
            seq=3, finish_reason="length", prompt_tokens=9, completion_tokens=99, cached_tokens=50, reasoning_tokens=7
        )
    )
    assert (done.completion_tokens, done.cached_tokens, done.reasoning_tokens) == (3, 9, 3)
    assert [p.kind for p in check.problems] == ["token_count_mismatch"]


async def test_constrained_answers_are_checked_byte_by_byte() -> None:
    fmt = bus.ResponseFormat(type="json_schema", schema={"type": "object", "properties": {"n": {"type": "integer"}}})
    req = _request(params=bus.SamplingParams(max_tokens=50, response_format=fmt))
    check = vetting.LegCheck(req, 0, frozenset(), await JsonChecks().answer(fmt))
    check.delta(bus.Delta(seq=1, text='{"n": ', tokens=1, token_ids=[1]))
    with pytest.raises(vetting.Violation):
        check.delta(bus.Delta(seq=2, text='"two"', tokens=1, token_ids=[1]))
    with pytest.raises(vetting.Violation):
        check.done(bus.Done(seq=2, finish_reason="stop", prompt_tokens=3, completion_tokens=1))
    # The good prefix still stands after a refused frame: the next provider continues from it.
    check.delta(bus.Delta(seq=2, text="2}", tokens=1, token_ids=[1]))
    assert (
        check.done(bus.Done(seq=3, finish_reason="stop", prompt_tokens=3, completion_tokens=2)).completion_tokens == 2
    )


def test_heartbeats_are_capped_and_inconsistencies_reported() -> None:
    hb = bus.Heartbeat("p", "v", "b", [bus.ModelInfo("m")], 4096, 4096, 0, 10**6, 1.0, 1.0, 0)
    fixed, problems = vetting.vet_heartbeat(hb, 64)
    assert (fixed.slots, fixed.slots_free, fixed.queue_limit) == (64, 64, 256)
    assert problems == []
    _, problems = vetting.vet_heartbeat(msgspec.structs.replace(hb, slots=2, slots_free=3), 64)
    assert [p.kind for p in problems] == ["inconsistent_heartbeat"]


@pytest.mark.parametrize(
    "hb",
    [
        {"interval_s": float("nan")},
        {"interval_s": 3600.0},
        {"decode_tps": float("inf")},
        {"slots": 10**9},
        {"slots_free": -1},
        {"cached_conversations": ["not-a-key"]},
        {"cached_conversations": ["0123456789abcdef"] * 65},
        {"models": [bus.ModelInfo("m\x00")]},
    ],
)
def test_impossible_heartbeats_do_not_decode(hb: dict[str, object]) -> None:
    base = bus.Heartbeat("p", "v", "b", [bus.ModelInfo("m")], 4, 4, 0, 4, 1.0, 1.0, 0)
    data = bus.encode(msgspec.structs.replace(base, **hb))
    with pytest.raises(msgspec.ValidationError):
        bus.decoder(bus.Heartbeat).decode(data)


async def test_a_reply_stream_holds_no_more_than_its_budget() -> None:
    stream = ReplyStream("r", "p", max_frames=3, max_bytes=1000)
    for seq in range(2):
        stream.receive(bus.encode(bus.Delta(seq=seq, text="a", tokens=1, token_ids=[1])))
    assert not stream.dead
    # Under the wire's bound for one frame, over what is left of this stream's bytes.
    stream.receive(bus.encode(bus.Delta(seq=2, text="a" * 2000, tokens=1, token_ids=[1])))
    assert stream.dead
    assert [(await stream.next(1)).seq for _ in range(2)] == [0, 1]
    with pytest.raises(StreamBroken) as broken:
        await stream.next(1)
    assert broken.value.violation == "frame_flood"


async def test_a_reply_stream_kills_itself_on_an_undecodable_or_oversized_frame() -> None:
    garbage = ReplyStream("r", "p")
    garbage.receive(b'{"type":"delta","seq":"zero"}')
    assert garbage.dead
    with pytest.raises(StreamBroken) as broken:
        await garbage.next(1)
    assert broken.value.violation == "undecodable_frame"
    huge = ReplyStream("r", "p")
    huge.receive(b" " * (MAX_FRAME_BYTES + 1))
    with pytest.raises(StreamBroken) as broken:
        await huge.next(1)
    assert broken.value.violation == "oversized_frame"


async def test_a_schema_too_slow_to_check_is_refused_once_and_remembered() -> None:
    import time

    from services.gateway.json_check import TooComplex

    checks = JsonChecks(build_timeout_s=0.3)
    # 300 patternProperties: seconds of llguidance's lexer construction.
    slow = {"type": "object", "patternProperties": {f"^p{i}[a-z]+$": {"type": "integer"} for i in range(300)}}
    fmt = bus.ResponseFormat(type="json_schema", schema=slow)
    started = time.monotonic()
    with pytest.raises(TooComplex):
        await checks.answer(fmt)
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    with pytest.raises(TooComplex):
        await checks.answer(fmt)
    assert time.monotonic() - started < 0.05, "the verdict is remembered"


async def test_a_limit_of_llguidance_is_not_blamed_on_the_provider() -> None:
    # A thousand optional properties: the parser's row limit, on the daemon's matcher as on ours.
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1000)}}
    answer = await JsonChecks().answer(bus.ResponseFormat(type="json_schema", schema=wide))
    assert answer.feed('{"p1": "x"}')
    assert answer.unchecked
    assert answer.complete()
