"""Server-sent-event framing, the same for the gateway and the daemon's local API.

Characters Python's str.splitlines() (and so httpx's aiter_lines() and many
hand-written clients) take for line breaks though SSE does not are escaped, so
text a model emits cannot cut an event in half. JSON allows them only inside
strings, where the escape means the same.
"""

from __future__ import annotations

import msgspec

DONE = b"data: [DONE]\n\n"

_ENCODER = msgspec.json.Encoder()
# U+0085, U+2028, U+2029 in UTF-8 (none of these byte runs occurs inside another character).
_LINE_BREAKERS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def _json(payload: object) -> bytes:
    encoded = _ENCODER.encode(payload)
    if encoded.isascii():
        return encoded  # most chunks: none of the line breakers (each is non-ASCII) can be in it
    for raw, escaped in _LINE_BREAKERS:
        # Not `raw in encoded`: for bytes, `in` first tries the needle as an integer (a byte value) and
        # builds and clears a TypeError each time, ~2,000 instructions (1.7% of a stream's, three a chunk).
        if encoded.find(raw) >= 0:
            encoded = encoded.replace(raw, escaped)
    return encoded


def json_text(text: str) -> bytes:
    """A JSON string, escaped as `data()` escapes the strings in a payload."""
    return _json(text)


def data(payload: object) -> bytes:
    """One `data:` event (OpenAI's chat and text completion streams have no event names)."""
    return b"data: " + _json(payload) + b"\n\n"


def named(event: str, payload: object) -> bytes:
    """One event with a name (Anthropic Messages, OpenAI Responses)."""
    return b"event: " + event.encode() + b"\ndata: " + _json(payload) + b"\n\n"
