"""The answer of a refresh-token rotation, kept for ``--oauth-refresh-reuse-seconds`` so a retry gets it again.

Clients do present one refresh token twice on purpose: processes sharing one token file refresh at once,
an SDK retries a request whose answer was lost. Within the short window after a rotation, the same client
presenting the same old token for the same resource (and scope, or less) gets the first rotation's tokens
again: no second branch of the grant, no extra valid token. Anything else is still a replay (RFC 9700
4.14.2): the grant ends.

The answer is stored under the old token's hash, sealed (AES-GCM) under a key derived (HKDF-SHA256) from
the old token itself: a dump of the store reveals no token, and only a holder of the old token opens it.
It is kept no longer than its access token lives (nor its refresh token, nor the grant), and a retry is told
only the lifetime its access token has left: the answer never hands out a token that no longer works.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import tokens as tk
from .model import IssuedTokens

_INFO = b"sidecar.oauth.refresh-reuse"


@dataclass(frozen=True)
class Rotation:
    """What a retry must match and what it gets again."""

    client_id: str
    resource: str  # the grant's resource: a retry naming another is a replay
    scope: str  # the scope the first request asked for (the grant's when it named none)
    session_key: bytes  # opens the grant's session record (the ID token of an openid grant)
    issued: IssuedTokens
    issued_at: float  # the rotation's time: a retry's expires_in counts what is left from then


def still_valid(rotation: Rotation, now: float) -> IssuedTokens | None:
    """The kept answer with the lifetime its access token has left now; None once nothing is left."""
    left = int(rotation.issued_at + rotation.issued.expires_in - now)
    return replace(rotation.issued, expires_in=left) if left > 0 else None


def _key(old_refresh_token: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(old_refresh_token.encode())


def seal(rotation: Rotation, old_refresh_token: str) -> bytes:
    issued = rotation.issued
    body = {
        "client_id": rotation.client_id,
        "resource": rotation.resource,
        "scope": rotation.scope,
        "session_key": base64.b64encode(rotation.session_key).decode(),
        "access_token": issued.access_token,
        "refresh_token": issued.refresh_token,
        "expires_in": issued.expires_in,
        "issued_scope": issued.scope,
        "issued_at": rotation.issued_at,
    }
    return tk.seal(_key(old_refresh_token), json.dumps(body, separators=(",", ":")).encode())


def unseal(blob: bytes, old_refresh_token: str) -> Rotation | None:
    """The rotation, or None for anything that does not open or read (then it is treated as a replay)."""
    raw = tk.unseal(_key(old_refresh_token), blob)
    if raw is None:
        return None
    try:
        body = json.loads(raw)
        return Rotation(
            client_id=str(body["client_id"]),
            resource=str(body["resource"]),
            scope=str(body["scope"]),
            session_key=base64.b64decode(body["session_key"]),
            issued=IssuedTokens(
                access_token=str(body["access_token"]),
                refresh_token=str(body["refresh_token"]),
                expires_in=int(body["expires_in"]),
                scope=str(body["issued_scope"]),
                resource=str(body["resource"]),
            ),
            issued_at=float(body["issued_at"]),
        )
    except (ValueError, TypeError, KeyError):
        return None
