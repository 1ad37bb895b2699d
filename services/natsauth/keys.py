"""NATS nkeys: account keys that sign user JWTs (Ed25519, via `nkeys`) and xkeys that seal callouts.

An nkey is base32 (no padding) of a prefix byte, 32 raw key bytes and a CRC-16
(little-endian); a seed puts the seed prefix ('S') before the key's own, so an
account seed starts "SA" and its public key "A". Server keys start "N", user
keys "U", curve (xkey) keys "X". `nkeys` on PyPI signs with account seeds but
knows no curve keys, so those (X25519 + XSalsa20-Poly1305, NaCl's box, as
nats-io/nkeys' xkeys.go) use PyNaCl, which `nkeys` itself is built on.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field

import nacl.exceptions
import nacl.public
import nacl.signing
import nkeys

PREFIX_SEED = 18 << 3
PREFIX_ACCOUNT = 0
PREFIX_SERVER = 13 << 3
PREFIX_USER = 20 << 3
PREFIX_CURVE = 23 << 3
_KEY_LEN = 32
# xkeys.go: "xkv1" + a 24-byte nonce + the box.
_XKEY_VERSION = b"xkv1"
_NONCE_LEN = 24


class NkeyError(ValueError):
    """Not a well-formed nkey of the expected kind (the message never quotes a seed)."""


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=")


def _unb32(text: str) -> bytes:
    try:
        return base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise NkeyError("not base32") from None


def _with_crc(raw: bytes) -> bytes:
    return raw + nkeys.crc16(raw).to_bytes(2, "little")


def _check_crc(raw: bytes) -> bytes:
    if len(raw) < 3 or nkeys.crc16(raw[:-2]).to_bytes(2, "little") != raw[-2:]:
        raise NkeyError("bad checksum")
    return raw[:-2]


def encode_public(prefix: int, key: bytes) -> str:
    return _b32(_with_crc(bytes([prefix]) + key))


def decode_public(text: str, prefix: int) -> bytes:
    """The 32 raw bytes of a public nkey of the given kind."""
    if len(text) != 56 or not text.isascii():
        raise NkeyError("not a public nkey")
    raw = _check_crc(_unb32(text))
    if len(raw) != 1 + _KEY_LEN or raw[0] != prefix:
        raise NkeyError("not a public nkey of the expected kind")
    return raw[1:]


def is_public(text: str, prefix: int) -> bool:
    try:
        decode_public(text, prefix)
    except NkeyError:
        return False
    return True


def encode_seed(prefix: int, raw: bytes) -> str:
    header = bytes([PREFIX_SEED | prefix >> 5, (prefix & 31) << 3])
    return _b32(_with_crc(header + raw))


def decode_seed(text: str, prefix: int) -> bytes:
    raw = _check_crc(_unb32(text.strip()))
    if len(raw) != 2 + _KEY_LEN or raw[0] & 248 != PREFIX_SEED:
        raise NkeyError("not an nkey seed")
    if ((raw[0] & 7) << 5 | (raw[1] & 248) >> 3) != prefix:
        raise NkeyError("a seed of another kind of key")
    return raw[2:]


def new_account_seed() -> str:
    return encode_seed(PREFIX_ACCOUNT, os.urandom(_KEY_LEN))


def new_curve_seed() -> str:
    return encode_seed(PREFIX_CURVE, os.urandom(_KEY_LEN))


@dataclass(frozen=True)
class SigningKey:
    """An nkey that signs JWTs: an account's issues user JWTs (the server's `auth_callout.issuer`)."""

    public: str
    _pair: nkeys.KeyPair = field(repr=False)

    @classmethod
    def from_seed(cls, seed: str, prefix: int = PREFIX_ACCOUNT) -> SigningKey:
        decode_seed(seed, prefix)  # our own check first: a clear error, never the seed in it
        pair = nkeys.from_seed(seed.strip().encode())
        return cls(pair.public_key.decode(), pair)

    def sign(self, data: bytes) -> bytes:
        signature: bytes = self._pair.sign(data)
        return signature


def account_public_key(seed: str) -> str:
    return SigningKey.from_seed(seed).public


def verify(public: str, prefix: int, data: bytes, signature: bytes) -> bool:
    """Whether `signature` is the Ed25519 signature of `data` by the public nkey `public`."""
    try:
        nacl.signing.VerifyKey(decode_public(public, prefix)).verify(data, signature)
    except (NkeyError, nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class CurveKey:
    """An xkey: the server seals each callout request to its public half, we seal the answer back."""

    public: str
    _private: nacl.public.PrivateKey = field(repr=False)

    @classmethod
    def from_seed(cls, seed: str) -> CurveKey:
        private = nacl.public.PrivateKey(decode_seed(seed, PREFIX_CURVE))
        return cls(encode_public(PREFIX_CURVE, bytes(private.public_key)), private)

    def seal(self, data: bytes, recipient: str) -> bytes:
        box = nacl.public.Box(self._private, nacl.public.PublicKey(decode_public(recipient, PREFIX_CURVE)))
        nonce = os.urandom(_NONCE_LEN)
        return _XKEY_VERSION + bytes(box.encrypt(data, nonce))

    def open(self, data: bytes, sender: str) -> bytes:
        if len(data) <= len(_XKEY_VERSION) + _NONCE_LEN or not data.startswith(_XKEY_VERSION):
            raise NkeyError("not an xkv1 sealed message")
        box = nacl.public.Box(self._private, nacl.public.PublicKey(decode_public(sender, PREFIX_CURVE)))
        body = data[len(_XKEY_VERSION) :]
        try:
            return bytes(box.decrypt(body[_NONCE_LEN:], body[:_NONCE_LEN]))
        except nacl.exceptions.CryptoError:
            raise NkeyError("cannot open the sealed message") from None


def curve_public_key(seed: str) -> str:
    return CurveKey.from_seed(seed).public
