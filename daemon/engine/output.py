"""Generated tokens to what a client may see: text, tool calls, log-probabilities.

Per request, in order: a streaming detokenizer (never splits a UTF-8
character), the thinking channel of a model that has one (split off as
reasoning, daemon/engine/reasoning.py), then on the answer alone: the tool-call
markup of the model's family (withheld from the text and parsed with mlx-lm's
tool parser for that family, while content before it still streams live), then
the stop strings (text that could begin one is held back until it is clear).
Stop strings apply to the answer, not to the reasoning: thinking that mentions
one does not end the answer before it began.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.generate import TextStateMachine
from mlx_lm.tokenizer_utils import _byte_decoder

from daemon.engine.base import TextChunk, ThinkTags
from daemon.engine.reasoning import ReasoningSplitter
from daemon.engine.text import StopFilter
from daemon.worker.protocol import Token
from schemas import bus


class TokenText:
    """Token ids to the text and raw bytes OpenAI's logprobs report for them."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._map: list[Any] | None = getattr(tokenizer.detokenizer, "tokenmap", None)

    def bytes_of(self, token: int) -> bytes:
        tokenmap = self._map
        if tokenmap is not None and 0 <= token < len(tokenmap):
            piece = tokenmap[token]
            if isinstance(piece, bytes):
                return piece
            decoder = _byte_decoder()
            out = bytearray()
            for ch in piece:
                b = decoder.get(ch)
                if b is None:
                    out.extend(ch.encode("utf-8"))
                else:
                    out.append(b)
            return bytes(out)
        return str(self._tokenizer.decode([token])).encode("utf-8")

    def logprob(self, token: int, logprob: float, top: list[tuple[int, float]] | None) -> bus.TokenLogprob:
        raw = self.bytes_of(token)
        alternatives: list[tuple[str, float, list[int] | None]] = []
        for tid, lp in top or []:
            b = self.bytes_of(tid)
            alternatives.append((b.decode("utf-8", "replace"), lp, list(b)))
        return bus.TokenLogprob(
            token=raw.decode("utf-8", "replace"), logprob=logprob, bytes=list(raw), top=alternatives
        )


@dataclass
class _Tools:
    start: str
    end: str
    parser: Any
    tools: list[dict[str, Any]]
    machine: TextStateMachine
    state: Any = None
    text: str = ""
    calls: list[bus.ToolCall] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = self.machine.make_state("normal")

    def split(self, text: str, *, final: bool) -> tuple[str, list[bus.ToolCall]]:
        """Content outside the markup, and the tool calls completed by this text."""
        self.state, segments = TextStateMachine.split(self.state, text)
        if final:
            self.state, flushed, current = TextStateMachine.flush(self.state)
            segments.append((current, flushed))
        content: list[str] = []
        done: list[bus.ToolCall] = []
        for state, piece in segments:
            if state == "tool":
                self.text += piece
            else:
                if self.text:
                    content.append(self._complete(done))
                content.append(piece)
        if final and self.text:
            # Markup the model never closed (e.g. it ran out of tokens): parse what there is.
            content.append(self._complete(done))
        return "".join(content), done

    def _complete(self, done: list[bus.ToolCall]) -> str:
        """Parse the collected markup into calls; markup that does not parse stays plain content."""
        text, self.text = self.text, ""
        try:
            parsed = self.parser(text, self.tools)
        except Exception:
            return self.start + text + self.end
        offered = {(t.get("function") or {}).get("name") for t in self.tools}
        calls = parsed if isinstance(parsed, list) else [parsed]
        # A call to a tool the request did not offer is not a call (gateways refuse to pass one on):
        # the markup stays text, as when it does not parse.
        if not calls or any(not isinstance(c, dict) or c.get("name") not in offered for c in calls):
            return self.start + text + self.end
        made = [
            bus.ToolCall(
                id=str(call.get("id") or f"call_{secrets.token_hex(12)}")[:256],
                name=str(call["name"]),
                arguments=(a if isinstance(a := call.get("arguments", {}), str) else json.dumps(a, ensure_ascii=False)),
            )
            for call in calls
        ]
        done.extend(made)
        self.calls.extend(made)
        return ""


class Output:
    """One request's tokens in, TextChunks out (None while everything is held back)."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        stops: list[str],
        tools: list[dict[str, Any]] | None,
        token_text: TokenText | None,
        continuation: bus.Continuation | None = None,
        think: ThinkTags | None = None,
    ) -> None:
        self._detokenizer = tokenizer.detokenizer
        self._stops = StopFilter(stops)
        self._token_text = token_text
        self._tools: _Tools | None = None
        if tools and getattr(tokenizer, "has_tool_calling", False) and tokenizer.tool_parser is not None:
            start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
            transitions = {"normal": [(start, "tool")], "tool": [(end, "normal")] if end else []}
            self._tools = _Tools(start, end or "", tokenizer.tool_parser, tools, TextStateMachine(transitions))
        self._think = ReasoningSplitter(think, tool_start=self._tools.start if self._tools else None) if think else None
        self.completion_tokens = 0
        # Tokens generated inside the thinking block, from the one completing `<think>` to the one
        # completing `</think>` (earlier providers' included, after a failover).
        self.reasoning_tokens = 0
        self._unsent_tokens = 0
        self._unsent_ids: list[int] = []
        self._unsent_logprobs: list[bus.TokenLogprob] = []
        self._primed = ""
        self._primed_reasoning = ""
        if continuation is not None:
            self._prime(continuation)

    def _prime(self, continuation: bus.Continuation) -> None:
        """Continue another provider's answer: the buyer has `continuation.text` (and `.reasoning`) already.

        The earlier tokens go through the detokenizer and the reasoning split one
        by one, as they did on the first provider (so spacing, partial characters,
        a half-read tag and whether the answer is inside the thinking block carry
        on exactly); their answer text beyond what was delivered, held back there
        as a possible stop sequence, goes through the stop filter again. What was
        held back is sent before the first new text.
        """
        reasoning: list[str] = []
        content: list[str] = []
        for token in continuation.token_ids:
            self._detokenizer.add_token(token)
            r, c = self._split(self._detokenizer.last_segment, final=False, counted=True)
            reasoning.append(r)
            content.append(c)
        prior_reasoning, prior = "".join(reasoning), "".join(content)
        if prior_reasoning.startswith(continuation.reasoning):
            self._primed_reasoning = prior_reasoning[len(continuation.reasoning) :]
        if prior.startswith(continuation.text):
            visible, _ = self._answer(prior[len(continuation.text) :], final=False)
            self._primed = visible

    @property
    def stopped(self) -> bool:
        """A stop string matched: generation must end now."""
        return self._stops.stopped

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that matched, if one did."""
        return self._stops.matched

    @property
    def called_tools(self) -> bool:
        return bool(self._tools and self._tools.calls)

    def feed(self, token: Token) -> TextChunk | None:
        if token.finish == "stop":
            # An end-of-sequence token: it ends the text but is not part of it.
            self._detokenizer.finalize()
        else:
            self.completion_tokens += 1
            self._unsent_tokens += 1
            self._unsent_ids.append(token.token)
            self._detokenizer.add_token(token.token)
            if token.finish is not None:
                self._detokenizer.finalize()
            if self._token_text is not None and token.logprob is not None:
                self._unsent_logprobs.append(self._token_text.logprob(token.token, token.logprob, token.top))
        final = token.finish is not None
        reasoning, text = self._split(self._detokenizer.last_segment, final=final, counted=token.finish != "stop")
        visible, calls = self._answer(text, final=final)
        if visible or reasoning or calls or final or self._stops.stopped:
            return self._chunk(visible, calls, reasoning)
        return None

    def cut(self) -> TextChunk | None:
        """Generation was stopped before a finish token: send what was counted, not held text."""
        return self._chunk("", [], "")

    def _split(self, text: str, *, final: bool, counted: bool) -> tuple[str, str]:
        """(reasoning, answer text) of a token's text; counts the token if it was part of the thinking."""
        if self._think is None:
            return "", text
        before = self._think.thinking
        reasoning, text = self._think.split(text, final=final)
        if counted and (before or self._think.thinking):
            self.reasoning_tokens += 1
        return reasoning, text

    def _answer(self, text: str, *, final: bool) -> tuple[str, list[bus.ToolCall]]:
        """Answer text through the tool markup and the stop strings: (what can be sent, calls completed)."""
        calls: list[bus.ToolCall] = []
        if self._tools is not None:
            text, calls = self._tools.split(text, final=final)
        visible = self._stops.feed(text)
        if final or self._stops.stopped:
            visible += self._stops.flush()
        return visible, calls

    def _chunk(self, text: str, calls: list[bus.ToolCall], reasoning: str) -> TextChunk | None:
        if self._unsent_tokens:
            text, self._primed = self._primed + text, ""
            reasoning, self._primed_reasoning = self._primed_reasoning + reasoning, ""
        if not (text or calls or reasoning or self._unsent_tokens):
            return None
        chunk = TextChunk(
            text,
            self._unsent_tokens,
            tuple(calls),
            tuple(self._unsent_logprobs),
            tuple(self._unsent_ids),
            reasoning=reasoning,
        )
        self._unsent_tokens = 0
        self._unsent_ids = []
        self._unsent_logprobs = []
        return chunk
