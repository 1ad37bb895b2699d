"""A short, content-free key for a conversation, computed the same way by gateways and daemons.

A daemon reports the keys of conversations whose prompt prefix its prompt cache
now holds (the messages plus the answer it gave); a gateway computes the key of
a new request's messages before its last one, and prefers the provider that
reports it: the next turn of a conversation reuses that cache. The key is a
64-bit BLAKE2 hash, so it says nothing about the content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgspec

_ENCODER = msgspec.msgpack.Encoder()


def conversation_key(turns: Iterable[tuple[str, str]]) -> str:
    """Key of a sequence of (role, content) turns."""
    return hashlib.blake2b(_ENCODER.encode([[r, c] for r, c in turns]), digest_size=8).hexdigest()
