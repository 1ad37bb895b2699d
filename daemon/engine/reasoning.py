"""A thinking model's text split into its reasoning and its answer, both streaming live.

Models with a thinking channel write `<think>…</think>` (the tags are the
tokenizer's; mlx-lm's TokenizerWrapper knows them) before the answer. The tags
are matched on decoded text with mlx-lm's TextStateMachine, so a tag split
across tokens still matches, and text that could begin one is held back until
it is clear: neither tag ever reaches the buyer, in either part (only an
answer cut short by max_tokens in the middle of a tag ends with what it wrote).

Whitespace that only frames the blocks is dropped, as hosted reasoning APIs
do: the newlines just inside the tags, those between `</think>` and the
answer, and those before a leading `<think>`. Everything else passes as is.

A model that starts a tool call while still thinking (mlx-lm's server allows
it too) has ended its reasoning: the markup goes on as answer text, where the
tool parser takes it.
"""

from __future__ import annotations

from mlx_lm.generate import TextStateMachine

from daemon.engine.base import ThinkTags

_CONTENT, _REASONING, _CALLED = "content", "reasoning", "called"


class ReasoningSplitter:
    def __init__(self, tags: ThinkTags, *, tool_start: str | None = None) -> None:
        transitions: dict[str, list[tuple[str, str]]] = {
            _CONTENT: [(tags.start, _REASONING)],
            _REASONING: [(tags.end, _CONTENT)],
            # After a call began inside the thinking: answer text to the end.
            _CALLED: [],
        }
        if tool_start:
            transitions[_REASONING].append((tool_start, _CALLED))
        self._tool_start = tool_start or ""
        self._current = _REASONING if tags.opened else _CONTENT
        self._state = TextStateMachine(transitions).make_state(self._current)
        # Reasoning: at the start of its block (leading whitespace dropped), and trailing
        # whitespace held until more reasoning follows (dropped if the block ends).
        self._reasoning_lead = True
        self._reasoning_space = ""
        # Whitespace before the answer's first text: "hold" at the very start (dropped if a block
        # opens, sent if the answer begins), "drop" after a block closed, then "pass".
        self._content_mode = "hold"
        self._content_space = ""

    @property
    def thinking(self) -> bool:
        """Inside the thinking block now (a closing tag may be half-read)."""
        return self._current == _REASONING

    def split(self, text: str, *, final: bool = False) -> tuple[str, str]:
        """Decoded text in: (reasoning, answer) that can be sent now. `final` flushes what is held."""
        self._state, segments = TextStateMachine.split(self._state, text)
        if final:
            self._state, flushed, current = TextStateMachine.flush(self._state)
            segments.append((current, flushed))
        reasoning: list[str] = []
        content: list[str] = []
        for state, piece in segments:
            if state != self._current:
                content.append(self._enter(state))
            if state == _REASONING:
                reasoning.append(self._reasoning(piece))
            else:
                content.append(self._content(piece))
        if final:
            self._reasoning_space = ""
            # An answer that is only whitespace is still the answer.
            content.append(self._content_space)
            self._content_space = ""
        return "".join(reasoning), "".join(content)

    def _enter(self, state: str) -> str:
        self._current = state
        if state == _REASONING:
            self._reasoning_lead = True
            # Whitespace before the block only framed it.
            self._content_space = ""
            return ""
        self._reasoning_space = ""
        if state == _CALLED:
            # The match consumed the tag: give it back for the tool parser.
            self._content_mode = "pass"
            return self._tool_start
        self._content_mode = "drop"
        return ""

    def _reasoning(self, piece: str) -> str:
        if self._reasoning_lead:
            piece = piece.lstrip()
            if not piece:
                return ""
            self._reasoning_lead = False
        text = self._reasoning_space + piece
        kept = text.rstrip()
        self._reasoning_space = text[len(kept) :]
        return kept

    def _content(self, piece: str) -> str:
        if self._content_mode == "pass":
            return piece
        stripped = piece.lstrip()
        if not stripped:
            if self._content_mode == "hold":
                self._content_space += piece
            return ""
        text = self._content_space + piece if self._content_mode == "hold" else stripped
        self._content_mode, self._content_space = "pass", ""
        return text
