"""Reasoning split from the answer on the daemon side, without a model: the splitter on its own,
then the output pipeline (detokenizer, think tags, tool markup, stops, failover priming) on the
scripted thinking model's real tokenizer, with tags split across tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from mlx_lm.utils import load_tokenizer

from daemon.engine import prompt
from daemon.engine.base import TextChunk, ThinkTags
from daemon.engine.output import Output
from daemon.engine.reasoning import ReasoningSplitter
from daemon.engine.text import StopFilter
from daemon.worker import protocol as p
from schemas import bus
from tests.support.output import feed_until_stopped
from tests.support.think_model import write_think_model
from tests.support.tool_model import WEATHER_TOOL

# Pure: no server, no process, no network (`just test -m unit`).
pytestmark = pytest.mark.unit

EOS = 2
TAGS = ThinkTags("<think>", "</think>")
OPENED = ThinkTags("<think>", "</think>", opened=True)
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def _split_all(pieces: list[str], tags: ThinkTags = TAGS, tool_start: str | None = None) -> tuple[str, str]:
    splitter = ReasoningSplitter(tags, tool_start=tool_start)
    out = [splitter.split(piece, final=i == len(pieces) - 1) for i, piece in enumerate(pieces)]
    return "".join(r for r, _ in out), "".join(c for _, c in out)


# ---- the splitter ------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
def test_tags_split_anywhere_never_leak(size: int) -> None:
    text = "<think>\nWeigh the options; 2 < 3.\n</think>\n\nThe answer is <b>bold</b>."
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    reasoning, content = _split_all(pieces)
    assert reasoning == "Weigh the options; 2 < 3."
    assert content == "The answer is <b>bold</b>."


def test_reasoning_streams_live_and_holds_only_a_possible_tag() -> None:
    splitter = ReasoningSplitter(TAGS)
    assert splitter.split("<think>Step one") == ("Step one", "")
    assert splitter.thinking
    # "</th" could be the closing tag: held back; then it is not, and goes out as reasoning.
    assert splitter.split(" then </th") == (" then", "")
    assert splitter.split("ree") == (" </three", "")
    assert splitter.split("</think>Done") == ("", "Done")
    assert not splitter.thinking


def test_block_opened_by_the_prompt() -> None:
    reasoning, content = _split_all(["\nI start inside.", "\n</think>\n", "\nAnswer"], OPENED)
    assert (reasoning, content) == ("I start inside.", "Answer")


def test_text_without_tags_is_all_answer_with_its_whitespace() -> None:
    assert _split_all(["    indented", " code\n", "\nmore "]) == ("", "    indented code\n\nmore ")
    assert _split_all(["\n\n"]) == ("", "\n\n")


def test_whitespace_before_a_leading_block_is_dropped() -> None:
    assert _split_all(["\n", "<think>", "x", "</think>", " ", "y"]) == ("x", "y")


def test_unclosed_block_at_the_end_keeps_its_partial_tag() -> None:
    assert _split_all(["<think>ran out</thi"]) == ("ran out</thi", "")


def test_tool_call_inside_the_thinking_ends_it() -> None:
    reasoning, content = _split_all(["<think>I will look it up. ", CALL], tool_start="<tool_call>")
    assert reasoning == "I will look it up."
    assert content == CALL
    # Without tools offered, the markup is just more reasoning.
    assert _split_all(["<think>I will look it up. ", CALL]) == ("I will look it up. " + CALL, "")


def test_stop_filter_names_the_earliest_match() -> None:
    stops = StopFilter(["cd", "b", "bc"])
    assert stops.feed("ab") == "a"
    assert stops.matched == "b"
    tie = StopFilter(["xy", "x"])
    assert tie.feed("-xy") == "-"
    assert tie.matched == "xy", "on a tie, the first listed"
    assert StopFilter(["zz"]).matched is None


# ---- the output pipeline on a real tokenizer -----------------------------------------


@pytest.fixture(scope="module")
def think_tokenizer(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = write_think_model(tiny_model_path, tmp_path_factory.mktemp("think-model") / "tiny-think")
    tokenizer = load_tokenizer(folder, eos_token_ids=[EOS])
    assert tokenizer.has_thinking
    assert tokenizer.has_tool_calling
    return tokenizer


def _ids(tokenizer: Any, *pieces: str) -> list[int]:
    """Token ids of each piece encoded on its own: a tag given in pieces is split across tokens."""
    return [t for piece in pieces for t in tokenizer.encode(piece, add_special_tokens=False)]


def _run(output: Output, ids: list[int], finish: str = "stop") -> list[TextChunk]:
    chunks = [output.feed(p.Token(id="r", token=t)) for t in ids[:-1]]
    if finish == "length":
        chunks.append(output.feed(p.Token(id="r", token=ids[-1], finish="length")))
    else:
        chunks.append(output.feed(p.Token(id="r", token=ids[-1])))
        chunks.append(output.feed(p.Token(id="r", token=EOS, finish="stop")))
    return [c for c in chunks if c is not None]


def _joined(chunks: list[TextChunk]) -> tuple[str, str]:
    return "".join(c.reasoning for c in chunks), "".join(c.text for c in chunks)


def test_output_splits_tags_cut_across_tokens(think_tokenizer: Any) -> None:
    ids = _ids(think_tokenizer, "<th", "ink>", "\nHmm, the sea", " is wide.\n</", "think", ">\n\n", "It is wide.")
    out = Output(think_tokenizer, stops=[], tools=None, token_text=None, think=TAGS)
    chunks = _run(out, ids)
    assert _joined(chunks) == ("Hmm, the sea is wide.", "It is wide.")
    assert not any("<" in c.text or "think" in c.reasoning for c in chunks)
    # Reasoning went out before the answer began, token by token.
    assert sum(1 for c in chunks if c.reasoning) > 1
    first_text = next(i for i, c in enumerate(chunks) if c.text)
    assert all(not c.reasoning for c in chunks[first_text:])
    assert sum(c.tokens for c in chunks) == len(ids) == out.completion_tokens


def test_reasoning_tokens_are_counted_exactly_with_single_token_tags(think_tokenizer: Any) -> None:
    inner = _ids(think_tokenizer, "The sea is deep")
    ids = [*_ids(think_tokenizer, "<think>"), *inner, *_ids(think_tokenizer, "</think>", "Hello there!")]
    assert len(_ids(think_tokenizer, "<think>")) == 1
    out = Output(think_tokenizer, stops=[], tools=None, token_text=None, think=TAGS)
    _run(out, ids)
    assert out.reasoning_tokens == len(inner) + 2, "the tags count as thinking"
    opened = Output(think_tokenizer, stops=[], tools=None, token_text=None, think=OPENED)
    _run(opened, ids[1:])
    assert opened.reasoning_tokens == len(inner) + 1


def test_without_think_tags_the_markup_stays_text(think_tokenizer: Any) -> None:
    ids = _ids(think_tokenizer, "<think>a</think>b")
    out = Output(think_tokenizer, stops=[], tools=None, token_text=None)
    assert _joined(_run(out, ids)) == ("", "<think>a</think>b")
    assert out.reasoning_tokens == 0


def test_stop_strings_apply_to_the_answer_only(think_tokenizer: Any) -> None:
    ids = _ids(think_tokenizer, "<think>I could say END here</think>", "The end. END of it")
    out = Output(think_tokenizer, stops=["END"], tools=None, token_text=None, think=TAGS)
    chunks = feed_until_stopped(out, ids)
    assert _joined(chunks) == ("I could say END here", "The end. ")
    assert out.stop_sequence == "END"


def test_tool_markup_after_thinking_still_parses(think_tokenizer: Any) -> None:
    ids = _ids(think_tokenizer, "<think>Weather, so the tool.</think>\n", "Checking. ", CALL)
    out = Output(think_tokenizer, stops=[], tools=[WEATHER_TOOL], token_text=None, think=TAGS)
    chunks = _run(out, ids)
    assert _joined(chunks) == ("Weather, so the tool.", "Checking. ")
    calls = [call for c in chunks for call in c.tool_calls]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert out.called_tools


def test_tool_call_before_the_thinking_closed_still_parses(think_tokenizer: Any) -> None:
    ids = _ids(think_tokenizer, "<think>I need the weather. ", CALL)
    out = Output(think_tokenizer, stops=[], tools=[WEATHER_TOOL], token_text=None, think=TAGS)
    chunks = _run(out, ids)
    assert _joined(chunks) == ("I need the weather.", "")
    assert [c.name for ch in chunks for c in ch.tool_calls] == ["get_weather"]


def test_failover_priming_continues_inside_and_after_the_thinking(think_tokenizer: Any) -> None:
    """Cut the answer after every token: a continuation says exactly what was not yet delivered."""
    ids = _ids(think_tokenizer, "<th", "ink>\nA long thought,", " then more.\n</", "think>\n\n", "Fine. STOP no")
    whole = Output(think_tokenizer, stops=["STOP"], tools=None, token_text=None, think=TAGS)
    expected = _joined(_run(whole, ids))
    assert expected == ("A long thought, then more.", "Fine. ")
    for cut in range(1, len(ids)):
        first = Output(think_tokenizer, stops=["STOP"], tools=None, token_text=None, think=TAGS)
        delivered = [c for c in (first.feed(p.Token(id="r", token=t)) for t in ids[:cut]) if c is not None]
        reasoning, text = _joined(delivered)
        done_ids = [t for c in delivered for t in c.token_ids]
        second = Output(
            think_tokenizer,
            stops=["STOP"],
            tools=None,
            token_text=None,
            think=TAGS,
            continuation=bus.Continuation(token_ids=done_ids, text=text, reasoning=reasoning),
        )
        rest: list[TextChunk] = []
        for t in ids[len(done_ids) :]:
            chunk = second.feed(p.Token(id="r", token=t))
            if chunk is not None:
                rest.append(chunk)
            if second.stopped:
                break
        more_reasoning, more_text = _joined(rest)
        assert (reasoning + more_reasoning, text + more_text) == expected, cut
        assert second.reasoning_tokens == whole.reasoning_tokens, cut


# ---- where generation starts: the prompt's tail -------------------------------------


def _chat(content: str, **kwargs: Any) -> bus.InferenceRequest:
    return bus.InferenceRequest(
        request_id="r",
        model="m",
        messages=[bus.BusMessage(role="user", content=content)],
        params=bus.SamplingParams(max_tokens=4),
        **kwargs,
    )


def test_prompt_tail_says_whether_the_block_is_open(think_tokenizer: Any) -> None:
    def tags(request: bus.InferenceRequest) -> ThinkTags | None:
        return prompt.thinking(think_tokenizer, request, prompt.encode(think_tokenizer, request))

    assert tags(_chat("Hi")) == ThinkTags("<think>", "</think>", opened=False)
    assert tags(_chat("Hi", chat_template_kwargs={"thinking": True})) == OPENED
    assert tags(_chat("Hi", chat_template_kwargs={"thinking": True}, reasoning_effort="none")) == ThinkTags(
        "<think>", "</think>", False
    )
    # A tag the buyer typed is not the template's.
    assert tags(_chat("Say <think> please")) == ThinkTags("<think>", "</think>", False)
    # Raw prompts are text, on any model.
    raw = bus.InferenceRequest(
        request_id="r", model="m", messages=[], prompt="<think>", params=bus.SamplingParams(max_tokens=4)
    )
    assert tags(raw) is None
    # A continuation's tokens are not the prompt's tail.
    cont = _chat(
        "Hi",
        chat_template_kwargs={"thinking": True},
        continuation=bus.Continuation(token_ids=_ids(think_tokenizer, "x</think>y"), text="y", reasoning="x"),
    )
    assert tags(cont) == OPENED


def test_models_without_thinking_get_no_tags(tiny_model_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_path, eos_token_ids=[EOS])
    assert not tokenizer.has_thinking
    request = _chat("Hi")
    assert prompt.thinking(tokenizer, request, prompt.encode(tokenizer, request)) is None


# ---- the bus: old peers and new fields -----------------------------------------------


def test_new_frame_fields_leave_old_frames_as_they_were() -> None:
    class OldDone(msgspec.Struct, frozen=True, tag="done"):
        seq: int
        finish_reason: str
        prompt_tokens: int
        completion_tokens: int

    # A delta without reasoning encodes as before; an old peer's Done decodes with the defaults.
    assert b"reasoning" not in bus.encode(bus.Delta(seq=1, text="hi", tokens=1))
    done = bus.decode_frame(
        msgspec.msgpack.encode(OldDone(seq=2, finish_reason="stop", prompt_tokens=3, completion_tokens=4))
    )
    assert isinstance(done, bus.Done)
    assert (done.reasoning_tokens, done.stop_sequence) == (0, None)
    # An old gateway's continuation (no reasoning) decodes; one with none delivered encodes without it.
    old = msgspec.msgpack.encode({"token_ids": [5], "text": "x"})
    assert msgspec.msgpack.decode(old, type=bus.Continuation) == bus.Continuation(token_ids=[5], text="x")
    assert bus.encode(bus.Continuation(token_ids=[5], text="x")) == old
