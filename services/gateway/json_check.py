"""Checking a provider's constrained answer: is it still JSON of the requested schema?

The daemon masks every token against the response_format grammar, so an honest
answer is always a prefix of a valid document and, when it ends on its own, a
complete one. A provider is untrusted, so the gateway re-checks the text it
receives against the same grammar (schemas/json_grammar.py), byte by byte, with
llguidance over a 256-symbol byte "tokenizer": a delta that breaks the grammar
is never forwarded, and the request moves to another provider from the last
good token. About 1.5 µs per byte; a fresh checker is a copy of a built one (~1 µs).

Building a grammar's matcher is usually a millisecond, but some schemas take
minutes (600 `patternProperties`: 70 s here) and llguidance's limits do not
bound that. So builds run off the event loop, one at a time, within a time
limit; a schema past it is the buyer's error (`request_too_complex`, as the
daemon says of the same schema), and the verdict is remembered, so repeating
the schema costs nothing. Recent grammars are kept built (agents reuse theirs).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
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


class TooComplex(Exception):
    """The schema's checker could not be built in time, or not at all."""


class Busy(Exception):
    """Another schema's build holds the gate (perhaps a runaway): not this schema's fault."""


class JsonAnswer:
    """One answer's text so far, checked against its response_format as it arrives."""

    def __init__(self, built: llguidance.LLMatcher) -> None:
        self._built = built
        self._accepted = bytearray()
        self._matcher = built.deep_copy()
        # Set when llguidance itself gave out (a resource limit, not the text): nothing more is checked.
        self.unchecked = ""

    def feed(self, text: str) -> bool:
        """Consume more of the answer; False (and the text so far unchanged) if it breaks the grammar."""
        if not text or self.unchecked:
            return True
        data = text.encode()
        if self._matcher.consume_tokens(list(data)) and not self._matcher.is_error():
            self._accepted += data
            return True
        error = self._matcher.get_error()
        # A matcher in error never recovers: start again from the good prefix.
        self._matcher = self._built.deep_copy()
        self._matcher.consume_tokens(list(self._accepted))
        if "doesn't satisfy the grammar" in error:
            return False
        # Past one of llguidance's own limits (e.g. an Earley row too wide for a schema with
        # thousands of optional properties): the daemon's matcher has the same limits, so this
        # says nothing against the provider. Stop checking rather than blame it.
        self.unchecked = error[:200]
        return True

    def complete(self) -> bool:
        """The text so far is a whole document valid against the schema (or could not be checked)."""
        return bool(self.unchecked) or self._matcher.is_accepting()


class JsonChecks:
    """Makes JsonAnswers for one gateway: builds off the loop, one at a time, within a time limit."""

    def __init__(self, *, build_timeout_s: float = 3.0, cache_size: int = 64) -> None:
        self._tokenizer = byte_tokenizer()
        self._timeout_s = build_timeout_s
        self._cache_size = cache_size
        self._gate = asyncio.Semaphore(1)
        # grammar → built matcher, or why it cannot be built (most recently used last).
        self._built: OrderedDict[str, llguidance.LLMatcher | Exception] = OrderedDict()

    async def answer(self, fmt: bus.ResponseFormat) -> JsonAnswer:
        """A checker for one answer; raises TooComplex, Busy, or ValueError/TypeError for an unusable schema."""
        grammar = json_grammar.grammar(fmt)
        built = self._built.get(grammar)
        if built is None:
            built = await self._build(grammar)
        self._built.move_to_end(grammar)
        if isinstance(built, Exception):
            raise built
        return JsonAnswer(built)

    async def _build(self, grammar: str) -> llguidance.LLMatcher | Exception:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._gate.acquire()
        except TimeoutError:
            raise Busy("other JSON schemas are being compiled; retry shortly") from None
        build = asyncio.ensure_future(asyncio.to_thread(self._matcher, grammar))
        # The gate opens when the build ends, even one that overran (a thread cannot be stopped):
        # a runaway build holds one core at most.
        build.add_done_callback(lambda _: self._gate.release())
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a buyer's cancel that lands
            # just as the build ends (gh-86296), and the request would go on to a provider.
            async with asyncio.timeout(self._timeout_s):
                built = await asyncio.shield(build)
        except TimeoutError:
            built = TooComplex(f"the JSON schema takes longer than {self._timeout_s:g} s to compile")
        self._built[grammar] = built
        while len(self._built) > self._cache_size:
            self._built.popitem(last=False)
        return built

    def _matcher(self, grammar: str) -> llguidance.LLMatcher | Exception:
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            return ValueError(f"the JSON schema cannot be enforced: {matcher.get_error()[:300]}")
        return matcher
