"""Messages on the NATS bus between gateways and provider daemons (msgpack).

A request's answer is a stream of frames on its reply subject. Every frame has
a sequence number starting at 0, and the stream always ends with a terminal
frame (`Done` or `Failed`), so the gateway detects a gap, a duplicate or a
provider that went silent instead of truncating an answer without a word.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

T = TypeVar("T")

# "tool_calls": the model called tools (only when the request offered some).
FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


class ToolCall(msgspec.Struct, frozen=True, array_like=True):
    id: str
    name: str
    # JSON text, as OpenAI sends it.
    arguments: str


class BusMessage(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    # Trailing fields are omitted when unset, so older peers (role, content) still decode.
    role: str
    content: str
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None


class ResponseFormat(msgspec.Struct, frozen=True, omit_defaults=True):
    """Constrain the answer to JSON: any object ("json_object") or one valid against `schema`.

    The daemon compiles it into a grammar and masks every token that would
    break it, so the text is always valid JSON or, cut by max_tokens, a prefix
    of valid JSON. A daemon that cannot constrain refuses the request.
    """

    type: Literal["json_object", "json_schema"]
    # The JSON Schema ("json_schema" only), as the buyer sent it. OpenAI's `strict` is not
    # carried: the schema is always enforced.
    schema: dict[str, Any] | None = None


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True):
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    # Per-token log-probabilities; `top_logprobs` alternatives for each (0-20).
    logprobs: bool = False
    top_logprobs: int = 0
    # True when the buyer set max_tokens: a daemon whose memory budget cannot hold it
    # refuses (context_over_budget) instead of silently generating less.
    max_tokens_explicit: bool = False
    # JSON output by constrained decoding (None: free text). Only daemons whose heartbeat
    # says `structured_output` get such requests: an older daemon would ignore this field.
    response_format: ResponseFormat | None = None


class Continuation(msgspec.Struct, frozen=True, omit_defaults=True):
    """What earlier providers generated for this request before they were lost.

    The new provider appends `token_ids` to the prompt and generates only what
    follows; `text` is what the buyer has already received (the tokens' text may
    run further: held back as a possible stop sequence or a partial character),
    so the provider sends exactly the rest and nothing is repeated or missing.
    `reasoning` is the same for the thinking channel; whether the answer is inside
    it is re-derived from the prompt and `token_ids`, as the first provider did.
    """

    token_ids: list[int]
    text: str
    reasoning: str = ""


class InferenceRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    request_id: str
    model: str
    messages: list[BusMessage]
    params: SamplingParams
    # Unix ms after which the gateway has given up; the daemon stops there too.
    deadline_ms: int = 0
    # A legacy text completion: `prompt` is sent to the model as is (no chat template).
    prompt: str | None = None
    # OpenAI function tools (JSON objects as the buyer sent them) and tool_choice.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    continuation: Continuation | None = None


class Cancel(msgspec.Struct, frozen=True):
    request_id: str
    reason: str = "client_disconnected"


# ---- reply frames -------------------------------------------------------------------


class Accepted(msgspec.Struct, frozen=True, tag="accepted"):
    """First frame: the provider took the request (prompt tokenized, queued or running)."""

    seq: int
    prompt_tokens: int
    queue_position: int = 0


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    token: str
    logprob: float
    # UTF-8 bytes of the token (it may be part of a character), as OpenAI reports them.
    bytes: list[int] | None = None
    # The most likely alternatives at this position: (token, logprob, bytes).
    top: list[tuple[str, float, list[int] | None]] = msgspec.field(default_factory=list)


class Delta(msgspec.Struct, frozen=True, tag="delta", omit_defaults=True):
    """New text. Never ends inside a multi-byte character, a possible stop sequence or think tag."""

    seq: int
    text: str
    tokens: int
    # Complete tool calls parsed from the model's tool markup (never partial).
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)
    # One entry per generated token in this delta, when the request asked for logprobs.
    logprobs: list[TokenLogprob] = msgspec.field(default_factory=list)
    # The ids of the `tokens` generated tokens, so another provider can continue after them.
    token_ids: list[int] = msgspec.field(default_factory=list)
    # New text of the model's thinking channel (`<think>…</think>`, tags removed); it came before
    # this frame's `text`. Chat requests on models that think only; `text` is then the answer alone.
    reasoning: str = ""


class Done(msgspec.Struct, frozen=True, tag="done"):
    seq: int
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    # Provider-side timings, for the gateway's summary log line.
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    generation_ms: float = 0.0
    # Of completion_tokens, those the model spent thinking (the think tags included).
    reasoning_tokens: int = 0
    # The request's stop string that ended the answer (finish_reason "stop"), if one did.
    stop_sequence: str | None = None


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    seq: int
    code: str
    message: str
    # True when nothing was generated and another provider may take the request.
    retryable: bool = False
    # The request field at fault, when the request itself was invalid (e.g. "max_tokens").
    param: str | None = None


Frame = Accepted | Delta | Done | Failed


# ---- pool membership ----------------------------------------------------------------


class ModelInfo(msgspec.Struct, frozen=True):
    id: str
    context_length: int = 0
    # False while the daemon's worker is unloaded for idleness: it reloads on the next request.
    loaded: bool = True
    # Longest prompt + max_tokens this daemon's memory budget admits (0: not reported).
    max_safe_context: int = 0
    # The daemon can constrain this model's output to JSON (response_format).
    structured_output: bool = False


class Heartbeat(msgspec.Struct, frozen=True):
    provider_id: str
    daemon_version: str
    # Changes when the daemon restarts, so a gateway can tell a restart from a blip.
    boot_id: str
    models: list[ModelInfo]
    slots: int
    slots_free: int
    queue_depth: int
    queue_limit: int
    decode_tps: float
    interval_s: float
    sent_at_ms: int
    draining: bool = False
    # The inference worker: "healthy", "starting", "restarting" (crashed, coming back) or "idle"
    # (unloaded, reloads on demand). While it restarts the daemon reports no room.
    worker: str = "healthy"
    # Keys (schemas.conversations) of recent conversations whose prefix the prompt cache holds.
    cached_conversations: list[str] = msgspec.field(default_factory=list)
    # Memory the Mac could still give to new work (0: unknown).
    memory_available_bytes: int = 0


class Leave(msgspec.Struct, frozen=True):
    provider_id: str
    boot_id: str


class Probe(msgspec.Struct, frozen=True):
    gateway_id: str


class Drain(msgspec.Struct, frozen=True):
    """An operator's order to one provider: finish the requests you have, take no new ones."""

    provider_id: str
    note: str = ""


_ENCODER = msgspec.msgpack.Encoder()
_FRAME_DECODER = msgspec.msgpack.Decoder(Frame)


def encode(message: msgspec.Struct) -> bytes:
    return _ENCODER.encode(message)


def decode_frame(data: bytes) -> Frame:
    return _FRAME_DECODER.decode(data)


def decoder(kind: type[T]) -> msgspec.msgpack.Decoder[T]:
    return msgspec.msgpack.Decoder(kind)
