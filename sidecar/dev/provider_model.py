"""Data types and signing keys of the development OIDC provider (NOT for production).

Kept apart from the HTTP handlers so the provider's state is plain data that
tests can inspect, and so the key handling (the only crypto here) is in one
place.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

FAULT_KINDS = ("500", "503", "timeout", "slow", "invalid_grant", "invalid_json", "raw")
"""What ``inject_fault`` can make the token endpoint do (``raw``: answer ``status`` with ``body`` verbatim)."""

ENDPOINT_FAULT_KINDS = ("500", "slow", "invalid_json")
"""What ``break_endpoint`` can make discovery or the JWKS do (``slow``: wait ``delay``, then answer)."""

AT_HASH_MODES = ("good", "bad", "none")
"""ID tokens from the token endpoint carry a correct ``at_hash``, a wrong one, or none."""

_DEFAULT_DELAYS = {"timeout": 30.0, "slow": 2.0}
_VERIFIER_RE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")


@dataclass
class DevUser:
    """A canned identity; the claims the provider puts in ID tokens and userinfo."""

    sub: str
    email: str
    name: str
    preferred_username: str
    groups: list[str]
    email_verified: bool = True

    def claims(self) -> dict[str, Any]:
        """Identity claims shared by the ID token and the userinfo response."""
        return {
            "sub": self.sub,
            "email": self.email,
            "email_verified": self.email_verified,
            "name": self.name,
            "preferred_username": self.preferred_username,
            "groups": list(self.groups),
        }


DEFAULT_USERS: dict[str, DevUser] = {
    "alice": DevUser("alice-sub-1", "alice@example.com", "Alice Example", "alice", ["admins", "staff"]),
    "bob": DevUser("bob-sub-2", "bob@example.org", "Bob Builder", "bob", ["staff"]),
}


@dataclass
class ClientReg:
    """A registered OAuth client. Empty ``redirect_uris`` allows any URI (dev convenience).

    ``client_secret=None`` makes a public client (PKCE only, no secret checked).
    """

    client_id: str
    client_secret: str | None
    redirect_uris: list[str] = field(default_factory=list)

    def allows_redirect(self, uri: str) -> bool:
        """Exact-match check, as OAuth 2.1 requires; empty list means anything goes."""
        return not self.redirect_uris or uri in self.redirect_uris


def default_clients() -> dict[str, ClientReg]:
    """A fresh copy of the default client so instances never share mutable state."""
    return {"sidecar-dev": ClientReg("sidecar-dev", "sidecar-dev-secret", [])}


class OAuthError(Exception):
    """An RFC 6749 error the HTTP layer renders as JSON (or a redirect)."""

    def __init__(self, error: str, description: str = "", status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = 401 if error in ("invalid_client", "invalid_token") else status


@dataclass
class AuthCode:
    """An issued authorization code and everything it is bound to."""

    client_id: str
    redirect_uri: str
    code_challenge: str
    nonce: str | None
    username: str
    scope: str
    expires_at: float
    auth_time: int
    used: bool = False
    family_id: str | None = None


@dataclass
class RefreshFamily:
    """All refresh tokens descending from one code exchange; revoked as a unit."""

    family_id: str
    username: str
    client_id: str
    scope: str
    auth_time: int
    revoked: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


@dataclass
class RefreshRecord:
    """One refresh token (stored by hash only). ``rotated`` = superseded by a newer one."""

    family_id: str
    expires_at: float
    rotated: bool = False


@dataclass
class Fault:
    """A pending token-endpoint fault; ``remaining == -1`` means until cleared."""

    kind: str
    remaining: int
    grant: str
    delay: float
    status: int = 400  # raw only
    body: str = ""  # raw only
    content_type: str = "application/json"  # raw only
    headers: dict[str, str] = field(default_factory=dict)  # raw only: e.g. Retry-After on a 429 or 503

    def matches(self, grant_type: str) -> bool:
        """``grant`` of ``"*"``/``"any"`` hits every grant type."""
        return self.grant in ("*", "any", grant_type)

    @property
    def effective_delay(self) -> float:
        """Seconds to sleep; timeout/slow get a default so ``delay=0`` still means something."""
        if self.delay > 0:
            return self.delay
        return _DEFAULT_DELAYS.get(self.kind, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON view for the stats endpoint."""
        return {
            "kind": self.kind,
            "remaining": self.remaining,
            "grant": self.grant,
            "delay": self.delay,
            "status": self.status,
        }


def random_token(nbytes: int = 32) -> str:
    """Opaque, URL-safe random string for codes and refresh tokens."""
    return secrets.token_urlsafe(nbytes)


def at_hash(access_token: str) -> str:
    """OIDC Core 3.1.3.6 for RS256: left half of SHA-256 of the access token, base64url, unpadded."""
    digest = hashlib.sha256(access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode("ascii")


def sha256_hex(value: str) -> str:
    """Hash under which tokens are stored and reported, so stats never leak tokens."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def s256(verifier: str) -> str:
    """PKCE S256 transform (RFC 7636 section 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verifier_ok(verifier: str | None, challenge: str) -> bool:
    """True if ``verifier`` is well formed and hashes to ``challenge``."""
    if not verifier or not _VERIFIER_RE.match(verifier):
        return False
    return secrets.compare_digest(s256(verifier).encode(), challenge.encode())


@lru_cache(maxsize=1)
def _first_private_key() -> rsa.RSAPrivateKey:
    """The initial key is shared per process: RSA generation is slow and tests start many
    providers. Rotated keys are always fresh."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class SigningKey:
    """An RS256 key pair with its ``kid``."""

    kid: str
    private_key: rsa.RSAPrivateKey = field(repr=False)

    def public_jwk(self) -> dict[str, Any]:
        """The JWK published at ``/jwks``."""
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return jwk


class KeyRing:
    """Published keys; the newest one signs. Old keys stay published after a soft rotation."""

    def __init__(self) -> None:
        self.keys: list[SigningKey] = [SigningKey(self._new_kid(), _first_private_key())]

    @staticmethod
    def _new_kid() -> str:
        return f"dev-{secrets.token_hex(6)}"

    @property
    def current(self) -> SigningKey:
        """The key that signs new tokens."""
        return self.keys[-1]

    def rotate(self, keep_old: bool = True) -> str:
        """Add a fresh signing key; drop the others unless ``keep_old``. Returns the new kid."""
        key = SigningKey(self._new_kid(), rsa.generate_private_key(public_exponent=65537, key_size=2048))
        self.keys = [*self.keys, key] if keep_old else [key]
        return key.kid

    def jwks(self) -> dict[str, Any]:
        """The JWK Set document."""
        return {"keys": [k.public_jwk() for k in self.keys]}

    def sign(self, claims: dict[str, Any]) -> str:
        """RS256 JWT with the current ``kid`` in the header."""
        key = self.current
        return jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid})

    def verify(self, token: str, issuer: str, verify_exp: bool = True) -> dict[str, Any]:
        """Decode one of our own tokens; raises ``jwt.InvalidTokenError`` otherwise."""
        kid = jwt.get_unverified_header(token).get("kid")
        key = next((k for k in self.keys if k.kid == kid), None)
        if key is None:
            raise jwt.InvalidTokenError("unknown kid")
        claims: dict[str, Any] = jwt.decode(
            token,
            key.private_key.public_key(),
            algorithms=["RS256"],
            issuer=issuer,
            options={"verify_aud": False, "verify_exp": verify_exp, "require": ["iss", "sub"]},
        )
        return claims
