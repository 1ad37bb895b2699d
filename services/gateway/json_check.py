"""Checking a provider's constrained answer: is it still JSON of the requested schema?

The daemon masks every token against the response_format grammar, so an honest
answer is always a prefix of a valid document and, when it ends on its own, a
complete one. A provider is untrusted, so the gateway re-checks the text it
receives against the same grammar (schemas/json_grammar.py), byte by byte, with
llguidance over a 256-symbol byte "tokenizer": a delta that breaks the grammar
is never forwarded, and the request moves to another provider from the last
good token. About 1.5 µs per byte here; building the matcher ~1 ms.
"""

from __future__ import annotations

from typing import Any, ClassVar

import llguidance

from schemas import bus, json_grammar


class _ByteVocabulary:
    """What llguidance's TokenizerWrapper reads: one token per byte value, plus an end token."""

    eos_token_id = 256
    bos_token_id = None
    tokens: ClassVar[list[bytes]] = [bytes([i]) for i in range(256)] + [b"<|end|>"]
    special_token_ids: ClassVar[list[int]] = [256]

    def __call__(self, text: Any) -> list[int]:
        return list(text if isinstance(text, bytes) else str(text).encode())


def byte_tokenizer() -> llguidance.LLTokenizer:
    """Build once per process and share (it is immutable)."""
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary()), slices=[])


class JsonAnswer:
    """One answer's text so far, checked against its response_format as it arrives."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, fmt: bus.ResponseFormat) -> None:
        self._tokenizer = tokenizer
        self._grammar = json_grammar.grammar(fmt)
        self._accepted = bytearray()
        self._matcher = self._fresh()

    def _fresh(self) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._tokenizer, self._grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def feed(self, text: str) -> bool:
        """Consume more of the answer; False (and the text so far unchanged) if it breaks the grammar."""
        if not text:
            return True
        data = text.encode()
        if self._matcher.consume_tokens(list(data)) and not self._matcher.is_error():
            self._accepted += data
            return True
        # A matcher in error never recovers: rebuild it from the good prefix (rare: a lying provider).
        self._matcher = self._fresh()
        self._matcher.consume_tokens(list(self._accepted))
        return False

    def complete(self) -> bool:
        """The text so far is a whole document valid against the schema."""
        return self._matcher.is_accepting()
