"""Encrypt session records at rest with a per-session key that only the cookie carries.

A dump of Redis alone therefore reveals no token: the AES-GCM key lives in the
user's cookie, and the storage key is bound in as associated data so a record
cannot be moved under another session id. Records are zlib-compressed first to
keep Redis memory per session small.
"""

from __future__ import annotations

import os
import zlib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import InvalidCookie

KEY_BYTES = 32  # AES-256-GCM: 256-bit keys, one per session, never reused across sessions
_NONCE_BYTES = 12


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def encrypt(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: no zlib header or checksum to store
    return nonce + AESGCM(key).encrypt(nonce, packer.compress(plaintext) + packer.flush(), context)


def decrypt(key: bytes, blob: bytes, context: bytes) -> bytes:
    """Raises InvalidCookie when the key (from the cookie) does not open the record."""
    try:
        packed = AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], context)
        return zlib.decompress(packed, -15)
    except (InvalidTag, ValueError, zlib.error) as exc:
        raise InvalidCookie("session key does not match its record") from exc
