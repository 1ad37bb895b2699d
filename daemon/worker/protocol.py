"""Messages between the daemon and its inference worker process (msgpack, length-prefixed).

The worker speaks on its own stdin/stdout pipes: a 4-byte big-endian length,
then one msgpack-encoded message. Only token ids cross the pipe; prompts are
tokenized and outputs detokenized on the daemon side, so the worker is nothing
but the model, its batch and its prompt cache.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

import msgspec

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20


# ---- daemon -> worker ----------------------------------------------------------------


class Generate(msgspec.Struct, frozen=True, tag="generate", omit_defaults=True):
    id: str
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    # -1: no logprobs; 0: the sampled token's; n: plus the n most likely alternatives.
    logprobs: int = -1
    # An llguidance grammar (the daemon compiled and checked it): every token is masked to fit it.
    grammar: str | None = None
    # How many trailing prompt tokens are output an earlier provider generated (a failover
    # continuation): the grammar consumes them before it constrains the first new token.
    grammar_prefix: int = 0


class Cancel(msgspec.Struct, frozen=True, tag="cancel"):
    id: str


class Ping(msgspec.Struct, frozen=True, tag="ping"):
    nonce: int


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    pass


ToWorker = Generate | Cancel | Ping | Shutdown


# ---- worker -> daemon ----------------------------------------------------------------


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    pid: int
    load_s: float
    weights_bytes: int
    # Measured on a real cache after warm-up: bytes of keys + values one token costs.
    kv_bytes_per_token: int
    batchable: bool
    # llguidance took this model's tokenizer: Generate.grammar is honoured.
    structured_output: bool = False


class LoadFailed(msgspec.Struct, frozen=True, tag="load_failed"):
    message: str


class Started(msgspec.Struct, frozen=True, tag="started"):
    """Prompt processing began; `cached_tokens` of the prompt came from the prompt cache."""

    id: str
    cached_tokens: int


class Token(msgspec.Struct, frozen=True, array_like=True):
    id: str
    token: int
    # "stop" (an EOS token: not part of the output) or "length"; None while generating.
    finish: str | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class Tokens(msgspec.Struct, frozen=True, tag="tokens"):
    """One decode step: a token for each sequence of the batch that produced one."""

    items: list[Token]


class Ended(msgspec.Struct, frozen=True, tag="ended"):
    """A sequence left the batch without a finish token: cancelled, or it failed."""

    id: str
    reason: str
    message: str = ""


class Stats(msgspec.Struct, frozen=True):
    active: int = 0
    waiting: int = 0
    memory_active: int = 0
    memory_peak: int = 0
    memory_cache: int = 0
    rss: int = 0
    prompt_cache_entries: int = 0
    prompt_cache_bytes: int = 0
    prompt_cache_hits: int = 0
    prompt_cache_misses: int = 0
    generated_tokens: int = 0
    # Batch steps taken so far: the supervisor's evidence that the loop is not wedged.
    steps: int = 0
    # Steps that decoded tokens, and the most sequences decoded in one step (since the worker started).
    decode_steps: int = 0
    peak_rows: int = 0


class Pong(msgspec.Struct, frozen=True, tag="pong"):
    nonce: int
    stats: Stats


FromWorker = Ready | LoadFailed | Started | Tokens | Ended | Pong

_ENCODER = msgspec.msgpack.Encoder()
TO_WORKER = msgspec.msgpack.Decoder(ToWorker)
FROM_WORKER = msgspec.msgpack.Decoder(FromWorker)


class ProtocolError(Exception):
    pass


def frame(message: msgspec.Struct) -> bytes:
    body = _ENCODER.encode(message)
    return _HEADER.pack(len(body)) + body


def read_frame(stream: BinaryIO) -> bytes | None:
    """The next frame's body from a blocking stream, or None at end of stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ProtocolError(f"frame of {size} bytes")
    body = stream.read(size)
    return body if len(body) == size else None


def frame_size(header: bytes) -> int:
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ProtocolError(f"frame of {size} bytes")
    return size


HEADER_SIZE = _HEADER.size
