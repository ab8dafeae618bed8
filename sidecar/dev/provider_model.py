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
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

FAULT_KINDS = ("500", "503", "timeout", "slow", "invalid_grant", "invalid_json", "raw")
"""What ``inject_fault`` can make the token endpoint do (``raw``: answer ``status`` with ``body`` verbatim)."""

ENDPOINT_FAULT_KINDS = ("500", "slow", "invalid_json")
"""What ``break_endpoint`` can make discovery or the JWKS do (``slow``: wait ``delay``, then answer)."""

SIGNING_ALGS = ("RS256", "PS256", "ES256", "EdDSA")
ACR_LEVELS = ("urn:dev:loa:1", "urn:dev:loa:2")
"""The authentication context classes the provider can do (discovery's ``acr_values_supported``); 1 is a password."""
ACR_MODES = ("honour", "basic", "none")
"""``acr_mode``, what the ID token says when ``acr_values`` was asked: the first asked value it can do (else level
1), level 1 whatever was asked (a provider that ignores acr_values), or no ``acr`` claim at all."""
"""What the provider can sign with (``signing_alg``): the algorithms real providers use for ID tokens."""

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
    offline: bool = True  # the code exchange issues a refresh token
    acr: str | None = None  # the ID token's acr claim (only when acr_values was asked)


@dataclass
class RefreshFamily:
    """All refresh tokens descending from one code exchange; revoked as a unit."""

    family_id: str
    username: str
    client_id: str
    scope: str
    auth_time: int
    revoked: bool = False
    acr: str | None = None
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


def at_hash(access_token: str, alg: str = "RS256") -> str:
    """OIDC Core 3.1.3.6: left half of the access token's hash under the ID token's algorithm (SHA-256 for the
    *256 algorithms, SHA-512 for EdDSA with Ed25519), base64url, unpadded."""
    digest = (hashlib.sha512 if alg == "EdDSA" else hashlib.sha256)(access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode("ascii")


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


def _new_private_key(alg: str) -> Any:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class SigningKey:
    """A key pair with its ``kid`` and the algorithm it signs with (``SIGNING_ALGS``)."""

    kid: str
    private_key: Any = field(repr=False)
    alg: str = "RS256"

    def public_jwk(self, with_kid: bool = True) -> dict[str, Any]:
        """The JWK published at ``/jwks`` (without ``kid`` as some providers publish a single key)."""
        public = self.private_key.public_key()
        jwk: dict[str, Any]
        if self.alg == "ES256":
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        elif self.alg == "EdDSA":
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        jwk.update({"use": "sig", "alg": self.alg, **({"kid": self.kid} if with_kid else {})})
        return jwk


class KeyRing:
    """Published keys; the newest one signs. Old keys stay published after a soft rotation."""

    def __init__(self) -> None:
        self.keys: list[SigningKey] = [SigningKey(self._new_kid(), _first_private_key())]
        self.send_kid = True  # off: neither the JWKS nor the tokens name a kid (older or minimal providers)

    @staticmethod
    def _new_kid() -> str:
        return f"dev-{secrets.token_hex(6)}"

    @property
    def current(self) -> SigningKey:
        """The key that signs new tokens."""
        return self.keys[-1]

    def rotate(self, keep_old: bool = True, alg: str | None = None) -> str:
        """Add a fresh signing key (of ``alg``, else the current one's); drop the others unless ``keep_old``.
        Returns the new kid."""
        alg = alg or self.current.alg
        if alg not in SIGNING_ALGS:
            raise ValueError(f"signing_alg must be one of {SIGNING_ALGS}")
        key = SigningKey(self._new_kid(), _new_private_key(alg), alg)
        self.keys = [*self.keys, key] if keep_old else [key]
        return key.kid

    def algs(self) -> list[str]:
        """The algorithms of the published keys, for discovery's ``id_token_signing_alg_values_supported``."""
        return list(dict.fromkeys(k.alg for k in self.keys))

    def jwks(self) -> dict[str, Any]:
        """The JWK Set document."""
        return {"keys": [k.public_jwk(self.send_kid) for k in self.keys]}

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        """A JWT signed by the current key, naming its ``kid`` unless ``send_kid`` is off; ``headers`` added."""
        key = self.current
        header = {**({"kid": key.kid} if self.send_kid else {}), **(headers or {})}
        return jwt.encode(claims, key.private_key, algorithm=key.alg, headers=header)

    def verify(self, token: str, issuer: str, verify_exp: bool = True) -> dict[str, Any]:
        """Decode one of our own tokens; raises ``jwt.InvalidTokenError`` otherwise."""
        kid = jwt.get_unverified_header(token).get("kid")
        key = next((k for k in self.keys if k.kid == kid), None) if kid is not None else self.current
        if key is None:
            raise jwt.InvalidTokenError("unknown kid")
        claims: dict[str, Any] = jwt.decode(
            token,
            key.private_key.public_key(),
            algorithms=[key.alg],
            issuer=issuer,
            options={"verify_aud": False, "verify_exp": verify_exp, "require": ["iss", "sub"]},
        )
        return claims
