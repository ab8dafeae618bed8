"""Minting, parsing, hashing and key wrapping for the tokens the authorization server issues.

Tokens are opaque ``<kind>.<grant_id>.<secret>``: ``sca`` access, ``scr`` refresh, ``scc`` authorization
code. The grant id lets the store find every key of a grant in one Redis Cluster slot; the secret
(256 bits) is what proves possession. The store keeps only ``token_hash`` of a token, and the grant's
session key wrapped under a key derived from the token itself (``wrap_key``), so a dump of Redis alone
opens no upstream tokens. Records are small JSON documents (``TokenRecord``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..headers import SIDECAR_TOKEN_PREFIXES

ACCESS = "sca"
REFRESH = "scr"
CODE = "scc"
KINDS = (ACCESS, REFRESH, CODE)

_GRANT_ID = re.compile(r"[A-Za-z0-9_-]{22}")
_TOKEN = re.compile(r"(sca|scr|scc)\.([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})")
_WRAP_AAD = b"sidecar.oauth.session-key"
_NONCE = 12


def new_grant_id() -> str:
    """128 random bits, URL-safe, no dots (the token separator)."""
    return secrets.token_urlsafe(16)


def mint(kind: str, grant_id: str) -> str:
    return f"{kind}.{grant_id}.{secrets.token_urlsafe(32)}"


def parse(token: str, kind: str) -> str | None:
    """The grant id of a well-formed token of ``kind``; None for anything else (checked before any lookup)."""
    if len(token) != 70:
        return None
    match = _TOKEN.fullmatch(token)
    if match is None or match.group(1) != kind:
        return None
    return match.group(2)


def looks_like_ours(token: str) -> bool:
    """A bearer token of the sidecar's shape (any kind), well-formed or not: ours to judge, not the JWT verifier's."""
    return token.startswith(SIDECAR_TOKEN_PREFIXES)


def valid_grant_id(grant_id: str) -> bool:
    return _GRANT_ID.fullmatch(grant_id) is not None


def token_hash(token: str) -> str:
    """Where a token's record lives: SHA-256, hex (a token is 256 random bits: no salt or slow hash needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same_secret(presented: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented client secret with its stored SHA-256."""
    return hmac.compare_digest(secret_hash(presented).encode(), stored_hash.encode())


def _wrapping_key(token: str) -> bytes:
    return hashlib.sha256(b"wrap:" + token.encode()).digest()


def wrap_key(session_key: bytes, token: str) -> bytes:
    """The grant's session key encrypted under a key only a holder of ``token`` can derive."""
    return seal(_wrapping_key(token), session_key)


def unwrap_key(wrapped: bytes, token: str) -> bytes | None:
    return unseal(_wrapping_key(token), wrapped)


def seal(key: bytes, plaintext: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _WRAP_AAD)


def unseal(key: bytes, blob: bytes) -> bytes | None:
    try:
        return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], _WRAP_AAD)
    except (InvalidTag, ValueError):
        return None


def device_wrapping_key(server_secret: bytes, device_code_hash: str) -> bytes:
    """Wraps a device approval's session key until the device redeems it: the user who approves never holds
    the device code, so the key is derived from the server's cookie secret (never in Redis) and the code's hash."""
    return hmac.new(server_secret, b"device:" + device_code_hash.encode(), hashlib.sha256).digest()


def grant_wrapping_key(server_secret: bytes, grant_id: str) -> bytes:
    """Wraps the server's own copy of a grant's session key (``Grant.sealed_key``): a grant ended without its
    client (grants page, per-user limit, replay, abandoned code) must still revoke its upstream refresh
    token, so the server needs to open the record alone. Derived from the cookie secret (never in Redis),
    so a dump of Redis alone still opens nothing."""
    return hmac.new(server_secret, b"grant:" + grant_id.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class TokenRecord:
    """What the store keeps per access or refresh token (JSON bytes)."""

    wrapped_key: bytes  # the grant's session key, wrapped under this token
    session_sid: str  # SessionRef.sid of the grant's session record
    resource: str  # audience: canonical resource URI
    resource_path: str
    client_id: str
    sub: str
    scope: str
    expires_at: float

    def to_bytes(self) -> bytes:
        fields = asdict(self)
        fields["wrapped_key"] = base64.b64encode(self.wrapped_key).decode()
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> TokenRecord | None:
        """None for anything unreadable (a record from another version): treated as no token."""
        try:
            fields = json.loads(raw)
            fields["wrapped_key"] = base64.b64decode(fields["wrapped_key"])
            return cls(**fields)
        except (ValueError, TypeError, KeyError):
            return None
