"""Secret token formats: a fixed prefix, 30 random base62 characters and a 6-character CRC32.

Like GitHub's tokens, the checksum lets us refuse a mistyped or truncated token
without a database query, and the fixed prefix lets secret scanners find leaks.
Buyers' API keys are `mp_`; provider daemons' tokens are `mpp_` (same rules, so
a key can never pass for a provider token or the other way round).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import zlib
from dataclasses import dataclass

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_CHARS = 30  # 30 * log2(62) ≈ 178 bits
_CHECK_CHARS = 6  # 62**6 > 2**32
# How many random characters their owner sees in listings: enough to tell tokens apart, useless to an attacker.
_DISPLAY_RANDOM = 6


def _base62(number: int, width: int) -> str:
    out = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        out.append(_ALPHABET[digit])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_CHARS)


@dataclass(frozen=True, slots=True)
class TokenFormat:
    prefix: str

    @property
    def length(self) -> int:
        return len(self.prefix) + _RANDOM_CHARS + _CHECK_CHARS

    def generate(self) -> str:
        body = "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_CHARS))
        return f"{self.prefix}{body}{_checksum(body)}"

    def well_formed(self, token: str) -> bool:
        if len(token) != self.length or not token.startswith(self.prefix):
            return False
        body, check = token[len(self.prefix) : -_CHECK_CHARS], token[-_CHECK_CHARS:]
        if any(c not in _ALPHABET for c in body):
            return False
        return hmac.compare_digest(check, _checksum(body))

    def display_prefix(self, token: str) -> str:
        return token[: len(self.prefix) + _DISPLAY_RANDOM]


API_KEYS = TokenFormat("mp_")
PROVIDER_TOKENS = TokenFormat("mpp_")

# The buyer's `mp_` key, the common case.
PREFIX = API_KEYS.prefix
KEY_LENGTH = API_KEYS.length
DISPLAY_CHARS = len(PREFIX) + _DISPLAY_RANDOM
generate = API_KEYS.generate
well_formed = API_KEYS.well_formed
display_prefix = API_KEYS.display_prefix


def digest(token: str) -> bytes:
    """What is stored: 178 random bits need no slow hash, and a SHA-256 stays indexable."""
    return hashlib.sha256(token.encode()).digest()
