"""Chat completion answers as the benchmark clients read them: streamed chunks, whole completions, errors."""

from __future__ import annotations

import msgspec


class Delta(msgspec.Struct):
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    delta: Delta
    finish_reason: str | None = None


class Usage(msgspec.Struct):
    completion_tokens: int


class Error(msgspec.Struct):
    message: str = ""
    code: str | None = None


class Chunk(msgspec.Struct):
    choices: list[ChunkChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    error: Error | None = None


class Message(msgspec.Struct):
    content: str | None = None


class Choice(msgspec.Struct):
    message: Message
    finish_reason: str | None = None


class Completion(msgspec.Struct):
    choices: list[Choice] = msgspec.field(default_factory=list)
    usage: Usage | None = None


class _Envelope(msgspec.Struct):
    error: Error


COMPLETION = msgspec.json.Decoder(Completion)
_CHUNK = msgspec.json.Decoder(Chunk)
_ENVELOPE = msgspec.json.Decoder(_Envelope)


def error_code(body: bytes) -> str:
    """The `error.code` of an error answer's body; "?" if it has none or is not our envelope."""
    try:
        return _ENVELOPE.decode(body).error.code or "?"
    except msgspec.DecodeError:
        return "?"


class Events:
    """The chunks of a streamed answer, from its bytes as they arrive. `feed` raises msgspec.DecodeError."""

    def __init__(self) -> None:
        self._buffer = b""
        # `data: [DONE]` was read: the stream ended properly.
        self.done = False

    def feed(self, data: bytes) -> list[Chunk]:
        """The chunks that `data` completes (a read may end mid-event: the rest waits for the next)."""
        self._buffer += data
        *events, self._buffer = self._buffer.split(b"\n\n")
        chunks: list[Chunk] = []
        for event in events:
            if not event.startswith(b"data: "):
                continue
            payload = event[6:]
            if payload == b"[DONE]":
                self.done = True
            else:
                chunks.append(_CHUNK.decode(payload))
        return chunks
