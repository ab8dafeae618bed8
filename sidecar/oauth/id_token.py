"""OpenID Connect ID tokens for the grants the authorization server issues (OIDC Core 3.1.3.3, 3.1.3.7).

Why issue them rather than drop ``openid``: the clients people use with an OAuth server that calls itself
an identity-aware proxy are often OpenID clients only (oidc-agent, openid-client's defaults, IDE plugins);
they ask for ``openid``, find ``/.well-known/openid-configuration`` and expect an ``id_token`` telling
them who signed in. Dropping the scope would turn them away; granting it without a token breaks Core.

- Key: an ES256 (P-256) key derived from each ``--cookie-secret`` with HKDF (its own label, so the key
  says nothing about the cookie keys): every replica derives the same key with nothing stored, and a
  secret rotation rotates it: the first secret signs, every configured one is published at ``P/jwks``.
- Claims: ``iss`` (the external origin the client used, like the metadata), ``sub`` (the user's subject at
  the upstream provider: stable per user, the same across clients), ``aud`` (the client id), ``exp`` (the
  access token's lifetime), ``iat``, ``auth_time`` (the grant's upstream sign-in), ``nonce`` when the
  authorization request had one, ``at_hash``; ``profile`` adds ``preferred_username``, ``email`` adds
  ``email`` when the provider gave one. Nothing else: the grant's record is all the server knows.
"""

from __future__ import annotations

import base64
import hashlib
import json
from functools import lru_cache
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..config import Config
from ..models import Session

ALGORITHM = "ES256"
_HKDF_INFO = b"sidecar.oauth.id-token-signing-key.v1"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@lru_cache(maxsize=8)
def signing_key(secret: bytes) -> tuple[ec.EllipticCurvePrivateKey, dict[str, str]]:
    """The P-256 key derived from one cookie secret, and its public JWK (``kid``: RFC 7638 thumbprint)."""
    material = HKDF(algorithm=hashes.SHA256(), length=48, salt=None, info=_HKDF_INFO).derive(secret)
    scalar = int.from_bytes(material, "big") % (_P256_ORDER - 1) + 1  # 384 bits reduced: no visible bias
    key = ec.derive_private_key(scalar, ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    jwk = {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
    }
    kid = _b64(hashlib.sha256(json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode()).digest())
    return key, {**jwk, "kid": kid, "use": "sig", "alg": ALGORITHM}


def jwks(config: Config) -> dict[str, Any]:
    """Every configured secret's public key, the signing one first."""
    keys = {signing_key(secret)[1]["kid"]: signing_key(secret)[1] for secret in config.cookie_secrets}
    return {"keys": list(keys.values())}


def at_hash(access_token: str) -> str:
    """OIDC Core 3.1.3.6: the left half of the access token's SHA-256 (ES256 hashes with SHA-256)."""
    return _b64(hashlib.sha256(access_token.encode("ascii")).digest()[:16])


def mint(
    config: Config,
    *,
    issuer: str,
    client_id: str,
    scope: str,
    session: Session,
    access_token: str,
    nonce: str,
    now: float,
    lifetime: float,
) -> str:
    """A signed ID token for the user of ``session`` (the grant's upstream record), for ``client_id``."""
    identity = session.identity
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": identity.sub,
        "aud": client_id,
        "iat": int(now),
        "exp": int(now + max(60.0, lifetime)),
        "auth_time": int(session.auth_time or session.signed_in_at or session.created_at or now),
        "at_hash": at_hash(access_token),
    }
    if nonce:
        claims["nonce"] = nonce
    if session.acr:  # how the grant's upstream sign-in authenticated the user (acr_values: sidecar.oauth.acr)
        claims["acr"] = session.acr
    granted = scope.split(" ")
    if "profile" in granted and (identity.preferred_username or identity.user):
        claims["preferred_username"] = identity.preferred_username or identity.user
    if "email" in granted and identity.email:
        claims["email"] = identity.email
    key, jwk = signing_key(config.cookie_secrets[0])
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": jwk["kid"], "typ": "JWT"})
