"""The `mp_` key format: 30 random base62 characters plus a 6-character CRC32.

Like GitHub's tokens, the checksum lets us refuse a mistyped or truncated key
without a database query, and the fixed prefix lets secret scanners find leaks.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import zlib

PREFIX = "mp_"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_CHARS = 30  # 30 * log2(62) ≈ 178 bits
_CHECK_CHARS = 6  # 62**6 > 2**32
KEY_LENGTH = len(PREFIX) + _RANDOM_CHARS + _CHECK_CHARS
# How much of a key its owner sees in listings: enough to tell keys apart, useless to an attacker.
DISPLAY_CHARS = len(PREFIX) + 6


def _base62(number: int, width: int) -> str:
    out = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        out.append(_ALPHABET[digit])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_CHARS)


def generate() -> str:
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_CHARS))
    return f"{PREFIX}{body}{_checksum(body)}"


def well_formed(key: str) -> bool:
    if len(key) != KEY_LENGTH or not key.startswith(PREFIX):
        return False
    body, check = key[len(PREFIX) : -_CHECK_CHARS], key[-_CHECK_CHARS:]
    if any(c not in _ALPHABET for c in body):
        return False
    return hmac.compare_digest(check, _checksum(body))


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_CHARS]
