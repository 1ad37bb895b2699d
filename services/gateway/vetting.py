"""What a provider says about a request, checked before it reaches a buyer, the ledger or the router.

A provider is untrusted input. The wire types bound every number it sends
(schemas/bus.py: past those a frame does not even decode); here are the checks
that need the request: the buyer is billed for the token ids the gateway
received, never for a declared count, and a frame that breaks one of these
rules is a protocol violation, which ends that provider's part of the request
(another provider continues it from the last good token) and is recorded
against the provider (services/providers/violations.py).

Every rule is an invariant an honest daemon keeps, so none can fire on one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from schemas import bus
from services.gateway.json_check import JsonAnswer

# A chat template wraps each message in a few tokens of role markup, and may add a default
# system prompt or tool instructions once; these bound both, generously.
_TOKENS_PER_MESSAGE = 64
_TEMPLATE_TOKENS = 4096
# Tool schemas are re-rendered by templates, often indented: their bytes count this many times.
_TOOL_BYTES_FACTOR = 4

# Frames one provider may send for one request: one per token it may generate, plus the few
# that carry no token (its acceptance, its end, held-back text released at the end).
_FRAMES_WITHOUT_TOKENS = 16
# Bytes of frames per token (a token's text and id, and with logprobs up to 20 alternatives
# with their bytes), plus a fixed allowance: far above honest, small enough to bound memory.
_BYTES_PER_TOKEN = 4096
_BASE_BYTES = 256 << 10
# Text one token can stand for: the longest tokens of real vocabularies are runs of a few dozen
# to a hundred-odd spaces or symbols. Text held back (a possible stop string, tool markup that
# did not parse) is released later but still came from counted tokens; a continuation's first
# frame may also carry text its predecessor held back: the allowance covers it.
_TEXT_BYTES_PER_TOKEN = 256
_TEXT_ALLOWANCE = 16 << 10


class Violation(Exception):
    """A provider broke the protocol; `kind` is what the operator sees counted."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def prompt_token_ceiling(request: bus.InferenceRequest) -> int:
    """The most prompt tokens this request can honestly come to.

    Every token of a byte-level BPE covers at least one byte of the rendered
    prompt, and a template adds a bounded amount of markup around what the
    buyer sent; a continuation's earlier tokens are part of the prompt too.
    """
    if request.prompt is not None:
        total = len(request.prompt.encode()) + _TEMPLATE_TOKENS
    else:
        total = _TEMPLATE_TOKENS
        for m in request.messages:
            total += _TOKENS_PER_MESSAGE + len(m.content.encode()) + len((m.name or "").encode())
            for call in m.tool_calls or ():
                total += _TOKENS_PER_MESSAGE + 2 * len((call.name + call.arguments).encode())
        if request.tools:
            total += _TOOL_BYTES_FACTOR * len(msgspec.json.encode(request.tools))
        if request.chat_template_kwargs:
            total += len(msgspec.json.encode(request.chat_template_kwargs))
    if request.continuation is not None:
        total += len(request.continuation.token_ids)
    return min(total, bus.MAX_COUNT)


def offered_tools(request: bus.InferenceRequest) -> frozenset[str]:
    """Names of the functions the model may call (none with tool_choice "none")."""
    choice = request.tool_choice
    if not request.tools or choice == "none":
        return frozenset()
    names = {str((t.get("function") or {}).get("name")) for t in request.tools if isinstance(t, dict)}
    if isinstance(choice, dict):
        chosen = (choice.get("function") or {}).get("name")
        return frozenset({chosen}) & names if isinstance(chosen, str) else frozenset()
    return frozenset(names)


def frame_budget(request: bus.InferenceRequest) -> tuple[int, int]:
    """(frames, bytes) one provider may send for this request, from what max_tokens allows."""
    tokens = _allowed_tokens(request)
    return tokens + _FRAMES_WITHOUT_TOKENS, _BASE_BYTES + tokens * _BYTES_PER_TOKEN


def _utf8_len(text: str) -> int:
    # Every frame's text is counted: most is ASCII, whose length CPython knows without encoding it.
    return len(text) if text.isascii() else len(text.encode())


def _allowed_tokens(request: bus.InferenceRequest) -> int:
    done_before = len(request.continuation.token_ids) if request.continuation else 0
    return max(1, request.params.max_tokens - done_before)


@dataclass
class LegCheck:
    """The checks on one provider's part of a request, frame by frame."""

    request: bus.InferenceRequest
    # The vocabulary size the provider reports for the model (0: unknown, only the wire bound holds).
    vocab_size: int
    tools: frozenset[str]
    # The answer's JSON so far, across every provider of the request (None: unconstrained).
    json: JsonAnswer | None = None
    tokens: int = 0
    text_bytes: int = 0
    problems: list[Violation] = field(default_factory=list)
    # What max_tokens leaves this leg (fixed for the leg: worked out once, not per frame).
    allowed: int = field(init=False)

    def __post_init__(self) -> None:
        self.allowed = _allowed_tokens(self.request)

    def accepted(self, frame: bus.Accepted) -> None:
        ceiling = prompt_token_ceiling(self.request)
        if frame.prompt_tokens > ceiling:
            detail = f"claimed {frame.prompt_tokens} prompt tokens; this request has at most {ceiling}"
            raise Violation("prompt_tokens_inflated", detail)

    def delta(self, frame: bus.Delta) -> None:
        """Raises Violation for a frame that must not reach the buyer.

        Every frame of every stream comes here: the checks a plain text frame needs run inline, and the
        ones for what most frames lack (reasoning, tool calls, logprobs, a JSON format) only when present.
        """
        ids = frame.token_ids
        n = len(ids)
        if frame.tokens != n:
            raise Violation("token_count_mismatch", f"declared {frame.tokens} tokens, sent {n} token ids")
        tokens = self.tokens + n
        if tokens > self.allowed:
            raise Violation("too_many_tokens", f"{tokens} tokens where max_tokens allows {self.allowed}")
        if self.vocab_size and n and max(ids) >= self.vocab_size:
            raise Violation("token_id_out_of_range", f"token id {max(ids)} in a vocabulary of {self.vocab_size}")
        text = frame.text
        # Most text is ASCII, whose length in bytes CPython knows without encoding it.
        text_bytes = self.text_bytes + (len(text) if text.isascii() else len(text.encode()))
        if frame.reasoning:
            text_bytes += _utf8_len(frame.reasoning)
        if text_bytes > _TEXT_ALLOWANCE + tokens * _TEXT_BYTES_PER_TOKEN:
            raise Violation("oversized_text", f"{text_bytes} bytes of text for {tokens} tokens")
        if frame.tool_calls or frame.logprobs or self.json is not None:
            self._rarer(frame, n)
        self.tokens = tokens
        self.text_bytes = text_bytes

    def _rarer(self, frame: bus.Delta, n: int) -> None:
        """`delta`'s checks of tool calls, logprobs and a JSON answer."""
        for call in frame.tool_calls:
            if call.name not in self.tools:
                raise Violation("unoffered_tool_call", f"a call to {call.name[:64]!r}, which the request did not offer")
        params = self.request.params
        if frame.logprobs and (not params.logprobs or len(frame.logprobs) > n):
            raise Violation("unrequested_logprobs", f"{len(frame.logprobs)} logprobs for {n} tokens")
        if frame.logprobs and any(len(lp.top) > params.top_logprobs for lp in frame.logprobs):
            raise Violation("unrequested_logprobs", f"more than the {params.top_logprobs} top logprobs asked for")
        if self.json is not None:
            if frame.reasoning or frame.tool_calls:
                raise Violation("invalid_json", "a JSON-constrained answer with reasoning or tool calls")
            if not self.json.feed(frame.text):
                raise Violation("invalid_json", "the answer stopped being valid JSON of the requested schema")

    def done(self, frame: bus.Done) -> bus.Done:
        """The final frame made consistent with what was received; raises Violation if it cannot be."""
        ended = frame.finish_reason == "stop" and frame.stop_sequence is None
        if self.json is not None and ended and not self.json.complete():
            # The grammar lets a constrained answer end on its own only once the document is whole.
            raise Violation("invalid_json", "the answer ended before its JSON document was complete")
        fixed = frame
        if frame.completion_tokens != self.tokens:
            self.problems.append(
                Violation(
                    "token_count_mismatch", f"declared {frame.completion_tokens} completion tokens, sent {self.tokens}"
                )
            )
            fixed = msgspec.structs.replace(fixed, completion_tokens=self.tokens)
        if frame.stop_sequence is not None and frame.stop_sequence not in self.request.params.stop:
            self.problems.append(Violation("unknown_stop_sequence", "a stop sequence the request did not send"))
            fixed = msgspec.structs.replace(fixed, stop_sequence=None)
        if frame.finish_reason == "tool_calls" and not self.tools:
            self.problems.append(Violation("unoffered_tool_call", "finish_reason tool_calls with no tools offered"))
            fixed = msgspec.structs.replace(fixed, finish_reason="stop")
        return msgspec.structs.replace(
            fixed,
            reasoning_tokens=min(fixed.reasoning_tokens, fixed.completion_tokens),
            cached_tokens=min(fixed.cached_tokens, fixed.prompt_tokens),
        )


# ---- heartbeats -------------------------------------------------------------------------------

# Far above an honest heartbeat (16 models and 64 conversation keys come to a few KB).
MAX_HEARTBEAT_BYTES = 16 << 10
# Heartbeats one provider may send in a burst, and per second after it: a daemon sends one a
# second plus one per probe or worker change.
HEARTBEAT_BURST = 20
HEARTBEATS_PER_S = 5.0


def vet_heartbeat(hb: bus.Heartbeat, max_slots: int) -> tuple[bus.Heartbeat, list[Violation]]:
    """The heartbeat as this gateway believes it: capacity within the operator's cap, consistent.

    A Mac may honestly have more slots than the cap (the operator raises it for that provider);
    claiming more free slots than slots, or a queue past its limit, only a broken daemon does.
    """
    problems: list[Violation] = []
    slots_free = hb.slots_free
    if slots_free > hb.slots:
        problems.append(Violation("inconsistent_heartbeat", f"{slots_free} free slots of {hb.slots}"))
        slots_free = hb.slots
    slots = min(hb.slots, max_slots)
    # A queue is worth at most a few slots' worth of waiting.
    queue_limit = min(hb.queue_limit, 4 * max(1, slots))
    fixed = hb
    if (slots, min(slots_free, slots), queue_limit) != (hb.slots, hb.slots_free, hb.queue_limit):
        fixed = msgspec.structs.replace(hb, slots=slots, slots_free=min(slots_free, slots), queue_limit=queue_limit)
    return fixed, problems
