"""Messages on the NATS bus between gateways and provider daemons (msgpack).

A request's answer is a stream of frames on its reply subject. Every frame has
a sequence number starting at 0, and the stream always ends with a terminal
frame (`Done` or `Failed`), so the gateway detects a gap, a duplicate or a
provider that went silent instead of truncating an answer without a word.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import msgspec

T = TypeVar("T")

FinishReason = Literal["stop", "length", "cancelled"]


class BusMessage(msgspec.Struct, frozen=True, array_like=True):
    role: str
    content: str


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True):
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] = msgspec.field(default_factory=list)


class InferenceRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    request_id: str
    model: str
    messages: list[BusMessage]
    params: SamplingParams
    # Unix ms after which the gateway has given up; the daemon stops there too.
    deadline_ms: int = 0


class Cancel(msgspec.Struct, frozen=True):
    request_id: str
    reason: str = "client_disconnected"


# ---- reply frames -------------------------------------------------------------------


class Accepted(msgspec.Struct, frozen=True, tag="accepted"):
    """First frame: the provider took the request (prompt tokenized, queued or running)."""

    seq: int
    prompt_tokens: int
    queue_position: int = 0


class Delta(msgspec.Struct, frozen=True, tag="delta"):
    """New text. Never ends inside a multi-byte character or a possible stop sequence."""

    seq: int
    text: str
    tokens: int


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


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    seq: int
    code: str
    message: str
    # True when nothing was generated and another provider may take the request.
    retryable: bool = False


Frame = Accepted | Delta | Done | Failed


# ---- pool membership ----------------------------------------------------------------


class ModelInfo(msgspec.Struct, frozen=True):
    id: str
    context_length: int = 0


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


class Leave(msgspec.Struct, frozen=True):
    provider_id: str
    boot_id: str


class Probe(msgspec.Struct, frozen=True):
    gateway_id: str


_ENCODER = msgspec.msgpack.Encoder()
_FRAME_DECODER = msgspec.msgpack.Decoder(Frame)


def encode(message: msgspec.Struct) -> bytes:
    return _ENCODER.encode(message)


def decode_frame(data: bytes) -> Frame:
    return _FRAME_DECODER.decode(data)


def decoder(kind: type[T]) -> msgspec.msgpack.Decoder[T]:
    return msgspec.msgpack.Decoder(kind)
