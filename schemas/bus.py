"""Messages on the NATS bus between gateways and provider daemons (msgpack).

A request's answer is a stream of frames on its reply subject. Every frame has
a sequence number starting at 0, and the stream always ends with a terminal
frame (`Done` or `Failed`), so the gateway detects a gap, a duplicate or a
provider that went silent instead of truncating an answer without a word.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

T = TypeVar("T")

# ---- bounds -------------------------------------------------------------------------
# A peer is untrusted input: every number it sends is bounded, so a lie is a decode error
# here rather than an overflow in Postgres or a NaN that never compares. The bounds are far
# above anything honest (a million-token context, a 256k vocabulary, 4096 slots).
MAX_COUNT = 1 << 24
MAX_TOKEN_ID = (1 << 24) - 1
MAX_SLOTS = 4096
# Models one daemon may announce, and recent conversations it may list.
MAX_MODELS = 16
MAX_CACHED_CONVERSATIONS = 64
MAX_TOOL_CALLS = 128
MAX_TOP_LOGPROBS = 20

Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_ID)]
TokenIds = Annotated[list[TokenId], msgspec.Meta(max_length=MAX_COUNT)]
# Durations and rates: finite and non-negative (NaN and infinities fail `ge`/`le`).
Millis = Annotated[float, msgspec.Meta(ge=0, le=1e9)]
Rate = Annotated[float, msgspec.Meta(ge=0, le=1e7)]
# Short identifiers a peer chooses (ids, versions, codes): no room for essays or control characters.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
Code = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
MAX_MESSAGE_CHARS = 4096
Message = Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_CHARS)]
ConversationKey = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]
# A subject token (schemas/subjects.py): provider, gateway and request ids.
Token = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
# A model folder's identity (daemon/models/identity.py): 64 lowercase hex digits, or empty (not known yet).
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^(?:[0-9a-f]{64})?$")]

# "tool_calls": the model called tools (only when the request offered some).
FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


class ToolCall(msgspec.Struct, frozen=True, array_like=True, gc=False):
    id: Annotated[str, msgspec.Meta(max_length=256)]
    name: Annotated[str, msgspec.Meta(max_length=256)]
    # JSON text, as OpenAI sends it.
    arguments: Annotated[str, msgspec.Meta(max_length=1 << 20)]


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
    max_tokens: Count
    temperature: float | None = None
    top_p: float | None = None
    seed: Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[TokenId, float] | None = None
    # Per-token log-probabilities; `top_logprobs` alternatives for each (0-20).
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] = 0
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

    token_ids: TokenIds
    text: str
    reasoning: str = ""


class InferenceRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    request_id: str
    model: str
    messages: list[BusMessage]
    params: SamplingParams
    # Unix ms after which the gateway has given up; the daemon stops there too.
    deadline_ms: Annotated[int, msgspec.Meta(ge=0, le=1 << 53)] = 0
    # A legacy text completion: `prompt` is sent to the model as is (no chat template).
    prompt: str | None = None
    # OpenAI function tools (JSON objects as the buyer sent them) and tool_choice.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    continuation: Continuation | None = None
    # How long the daemon may gather tokens into one frame. 0 (a stream): every token that is ready
    # goes at once. A whole answer reaches its buyer only at the end, so one frame per this many ms
    # costs the gateway one decode instead of one per token (a failover resumes from the last frame).
    frame_ms: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    # The gateway also takes this request's frames in bundles (`Bundle`, on subjects.bundle): frames of
    # several of its requests made in one loop turn (a batch's decode step) travel as one NATS message.
    # An older daemon ignores the field and sends every frame on its own, which gateways always take.
    bundle: bool = False
    # While this request runs, the gateway tells the provider every this many ms that it is still there
    # (`GatewayAlive`, on subjects.notices): a provider that hears nothing from it for a few of these stops
    # generating for a gateway that died (killed, its host gone), instead of until max_tokens or the
    # deadline. 0 (an older gateway): it never says so, and nothing is stopped for the lack of it.
    keepalive_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 0


class Cancel(msgspec.Struct, frozen=True):
    request_id: Token
    reason: Annotated[str, msgspec.Meta(max_length=64)] = "client_disconnected"


# ---- reply frames -------------------------------------------------------------------


class Accepted(msgspec.Struct, frozen=True, tag="accepted", gc=False):
    """First frame: the provider took the request (prompt tokenized, queued or running)."""

    seq: Count
    prompt_tokens: Count
    queue_position: Count = 0


_Byte = Annotated[int, msgspec.Meta(ge=0, le=255)]
_TokenBytes = Annotated[list[_Byte], msgspec.Meta(max_length=1024)]
_TokenText = Annotated[str, msgspec.Meta(max_length=1024)]


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True, gc=False):
    token: _TokenText
    logprob: float
    # UTF-8 bytes of the token (it may be part of a character), as OpenAI reports them.
    bytes: _TokenBytes | None = None
    # The most likely alternatives at this position: (token, logprob, bytes).
    top: Annotated[list[tuple[_TokenText, float, _TokenBytes | None]], msgspec.Meta(max_length=MAX_TOP_LOGPROBS)] = (
        msgspec.field(default_factory=list)
    )


class Delta(msgspec.Struct, frozen=True, tag="delta", omit_defaults=True, gc=False):
    """New text. Never ends inside a multi-byte character, a possible stop sequence or think tag."""

    seq: Count
    text: str
    # Declared count; the gateway bills `token_ids`, and a disagreement is a protocol violation.
    tokens: Count
    # Complete tool calls parsed from the model's tool markup (never partial).
    tool_calls: Annotated[list[ToolCall], msgspec.Meta(max_length=MAX_TOOL_CALLS)] = msgspec.field(default_factory=list)
    # One entry per generated token in this delta, when the request asked for logprobs.
    logprobs: list[TokenLogprob] = msgspec.field(default_factory=list)
    # The ids of the `tokens` generated tokens, so another provider can continue after them.
    token_ids: TokenIds = msgspec.field(default_factory=list)
    # New text of the model's thinking channel (`<think>…</think>`, tags removed); it came before
    # this frame's `text`. Chat requests on models that think only; `text` is then the answer alone.
    reasoning: str = ""


class Finished(msgspec.Struct, frozen=True, gc=False):
    """The end of an answer: the engine's last event, the `Done` frame's body, the gateway's last event.

    The gateway's carries the tokens it bills (never more completion than it saw).
    """

    finish_reason: FinishReason
    prompt_tokens: Count
    completion_tokens: Count
    cached_tokens: Count = 0
    # Provider-side timings, for the gateway's summary log line.
    queue_ms: Millis = 0.0
    ttft_ms: Millis = 0.0
    generation_ms: Millis = 0.0
    # Of completion_tokens, those the model spent thinking (the think tags included).
    reasoning_tokens: Count = 0
    # The request's stop string that ended the answer (finish_reason "stop"), if one did.
    stop_sequence: str | None = None


class Done(Finished, frozen=True, tag="done", kw_only=True):
    # A map on the wire, so the field order does not matter to older peers.
    seq: Count


class Failed(msgspec.Struct, frozen=True, tag="failed", gc=False):
    seq: Count
    # A schemas.codes.FailCode from an honest daemon; open on the wire, so a newer daemon's code
    # decodes, and anything outside codes.REQUEST_FAULTS is the provider's failure.
    code: Code
    message: Message
    # True when nothing was generated and another provider may take the request.
    retryable: bool = False
    # The request field at fault, when the request itself was invalid (e.g. "max_tokens").
    param: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\[\]-]{1,128}$")] | None = None


# gc=False on the frames and what they hold: a stream is a frame per token, each a new object the
# garbage collector would otherwise track and walk (young collections every few streams). Frames are
# immutable and hold only strings, numbers and lists of them: they can never be part of a cycle.
Frame = Accepted | Delta | Done | Failed


# ---- pool membership ----------------------------------------------------------------


class ModelInfo(msgspec.Struct, frozen=True):
    id: Name
    context_length: Count = 0
    # False while the daemon's worker is unloaded for idleness: it reloads on the next request.
    loaded: bool = True
    # Longest prompt + max_tokens this daemon's memory budget admits (0: not reported).
    max_safe_context: Count = 0
    # The daemon can constrain this model's output to JSON (response_format).
    structured_output: bool = False
    # Token ids this model has (0: not reported); a continuation's ids are checked against it.
    vocab_size: Count = 0
    # SHA-256 identity of the model's weights, config and tokenizer files (daemon/models/identity.py);
    # empty while the daemon is still hashing them. Gateways route a model id only to the identities
    # the operator's catalog lists for it (services/catalog/).
    weights_sha256: Sha256 = ""


# Heartbeats come every second or so; these bound how often and how seldom a daemon may claim.
MIN_HEARTBEAT_S = 0.05
MAX_HEARTBEAT_S = 10.0


class Heartbeat(msgspec.Struct, frozen=True):
    provider_id: Token
    daemon_version: Annotated[str, msgspec.Meta(max_length=64)]
    # Changes when the daemon restarts, so a gateway can tell a restart from a blip.
    boot_id: Annotated[str, msgspec.Meta(max_length=64)]
    models: Annotated[list[ModelInfo], msgspec.Meta(max_length=MAX_MODELS)]
    slots: Annotated[int, msgspec.Meta(ge=0, le=MAX_SLOTS)]
    slots_free: Annotated[int, msgspec.Meta(ge=0, le=MAX_SLOTS)]
    queue_depth: Count
    queue_limit: Count
    # Claimed only: gateways route on the speed they observe themselves.
    decode_tps: Rate
    interval_s: Annotated[float, msgspec.Meta(ge=MIN_HEARTBEAT_S, le=MAX_HEARTBEAT_S)]
    sent_at_ms: Annotated[int, msgspec.Meta(ge=0, le=1 << 53)]
    draining: bool = False
    # The inference worker: a schemas.codes.WorkerState (open on the wire, for newer daemons).
    # While it restarts the daemon reports no room.
    worker: Annotated[str, msgspec.Meta(max_length=32)] = "healthy"
    # Keys (schemas.conversations) of recent conversations whose prefix the prompt cache holds.
    cached_conversations: Annotated[list[ConversationKey], msgspec.Meta(max_length=MAX_CACHED_CONVERSATIONS)] = (
        msgspec.field(default_factory=list)
    )
    # Memory the Mac could still give to new work (0: unknown).
    memory_available_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 53)] = 0


class Leave(msgspec.Struct, frozen=True):
    provider_id: Token
    boot_id: Annotated[str, msgspec.Meta(max_length=64)]


class Probe(msgspec.Struct, frozen=True):
    gateway_id: Token


class ModelVerdict(msgspec.Struct, frozen=True, omit_defaults=True):
    """How the pool sees one model a provider serves.

    `status`: "verified" (its identity is in the catalog for this id), "uncatalogued" (the id has
    no catalog entry and this pool routes such ids anyway), "not_in_catalog" (the id has none and
    this pool refuses such ids), "hash_mismatch" (the catalog lists other identities for this id),
    "hash_pending" (the provider has not reported an identity yet), "canary_failed".
    A code, not a closed list, so a newer control plane can add one without breaking older daemons.
    """

    model: Name
    status: Code
    # Whether gateways route requests for this model to the provider.
    routed: bool
    weights_sha256: Sha256 = ""
    detail: Message = ""


class PoolNotice(msgspec.Struct, frozen=True, tag="pool_notice"):
    """The control plane tells one provider how the pool sees its models (and why it gets no traffic)."""

    provider_id: Token
    models: Annotated[list[ModelVerdict], msgspec.Meta(max_length=MAX_MODELS)]
    sent_at_ms: Annotated[int, msgspec.Meta(ge=0, le=1 << 53)] = 0


class GatewayAlive(msgspec.Struct, frozen=True, tag="gateway_alive"):
    """A gateway replica is still there for its requests running on this provider (see
    `InferenceRequest.keepalive_ms`), and which of them it still wants. On the provider's notices subject,
    which only the control plane may publish to; an older daemon does not decode it and ignores it.

    `request_ids`: every request of this gateway open with this provider when it was sent. A request the
    provider runs for this gateway that two notices in a row leave out is not wanted any more (its cancel
    was lost: sent while the provider's connection was down, after a failover say) and stops. None: not
    listed (more than MAX_SLOTS), so nothing is stopped for being left out.
    """

    gateway_id: Token
    provider_id: Token
    request_ids: Annotated[list[Token], msgspec.Meta(max_length=MAX_SLOTS)] | None = None


class Drain(msgspec.Struct, frozen=True):
    """An operator's order to one provider: finish the requests you have, take no new ones."""

    provider_id: str
    note: str = ""


# ---- bundles: several requests' frames in one message ------------------------------------

# How many frames one bundle may hold (a decode step of a big batch; a daemon sends more as several).
MAX_BUNDLE = 1024
# Each entry: the request id, and the frame as `encode` made it (the gateway decodes and checks it
# exactly as a frame sent alone). Not a Token pattern: the id is only a key in the gateway's map of
# its open streams, where no string that is not a valid token can match.
Bundle = Annotated[
    list[tuple[Annotated[str, msgspec.Meta(max_length=64)], msgspec.Raw]], msgspec.Meta(max_length=MAX_BUNDLE)
]

_ENCODER = msgspec.msgpack.Encoder()
_FRAME_DECODER = msgspec.msgpack.Decoder(Frame)
_BUNDLE_DECODER: msgspec.msgpack.Decoder[Bundle] = msgspec.msgpack.Decoder(Bundle)


def encode_bundle(frames: list[tuple[str, bytes]]) -> bytes:
    """(request id, encoded frame) pairs as one message; the frames' bytes are copied in as they are."""
    return _ENCODER.encode([(rid, msgspec.Raw(data)) for rid, data in frames])


def decode_bundle(data: bytes) -> Bundle:
    return _BUNDLE_DECODER.decode(data)


def encode(message: msgspec.Struct) -> bytes:
    return _ENCODER.encode(message)


def decode_frame(data: bytes | msgspec.Raw) -> Frame:
    return _FRAME_DECODER.decode(data)


def decoder(kind: type[T]) -> msgspec.msgpack.Decoder[T]:
    return msgspec.msgpack.Decoder(kind)
