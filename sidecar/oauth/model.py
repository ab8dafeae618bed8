"""What the authorization server keeps: clients, grants, codes, device authorizations, issued tokens.

A *grant* is one client's long-lived access for one user to one resource. It owns a session record in
the ordinary session store (``Sessions``) holding the upstream provider's tokens, refreshed by the same
single-flight ``Refresher`` as browser sessions. That record is encrypted with its own key, like a
browser session; the key is never stored in the clear: every token record the grant issues (access
token, refresh token, authorization code) carries the key wrapped under a key derived from that token
(``tokens.wrap_key``), so only a holder of a live token can open the upstream tokens.

Tokens are opaque: ``<kind>.<grant_id>.<secret>``. The grant id in them lets a Redis Cluster keep every
key of one grant in one slot (``{grant_id}`` hash tag) so rotation and revocation are single atomic
scripts; the store keeps only their SHA-256.
"""

from __future__ import annotations

from dataclasses import dataclass

GRANT_AUTHORIZATION_CODE = "authorization_code"
GRANT_REFRESH_TOKEN = "refresh_token"
GRANT_DEVICE_CODE = "urn:ietf:params:oauth:grant-type:device_code"
GRANT_TYPES = (GRANT_AUTHORIZATION_CODE, GRANT_REFRESH_TOKEN, GRANT_DEVICE_CODE)
AUTH_METHODS = ("none", "client_secret_post", "client_secret_basic")


@dataclass(frozen=True)
class Client:
    """A registered client (RFC 7591), or one described by its Client ID Metadata Document (``client_id`` is
    then that https URL, ``metadata_document`` True, and nothing is stored but a cache)."""

    client_id: str
    client_name: str
    redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    token_endpoint_auth_method: str  # one of AUTH_METHODS
    secret_hash: str | None  # SHA-256 hex of the client secret; None for public clients
    created_at: float
    registered_from: str  # client IP at registration ("" for a metadata document)
    client_uri: str = ""
    logo_uri: str = ""
    metadata_document: bool = False
    scope: str = ""  # the registered scope (canonical order); "" when it named none: the whole vocabulary


@dataclass(frozen=True)
class Grant:
    """One client's access for one user to one resource, until revoked, idle or too old."""

    grant_id: str
    sub: str  # the user's subject at the provider (the sessions' user index)
    user: str  # what the grants page shows: email, else user name
    client_id: str
    client_name: str
    resource: str  # canonical resource URI (external origin + path), the tokens' audience
    resource_path: str  # the --oauth-resource path it names
    scope: str
    session_sid: str  # SessionRef.sid of the session record holding the upstream tokens
    created_at: float
    last_used_at: float
    last_used_from: str  # client IP of the last token use
    user_agent: str  # of the client at its last token request (cut to 200 characters)
    expires_at: float  # created_at + --oauth-refresh-max-lifetime


@dataclass(frozen=True)
class AuthorizationCode:
    """An issued code (RFC 6749 4.1.2), single use; ``wrapped_key`` opens the grant's session record."""

    grant_id: str
    client_id: str
    redirect_uri: str
    code_challenge: str  # S256 only
    resource: str
    scope: str
    wrapped_key: bytes
    expires_at: float
    nonce: str = ""  # the OpenID request's nonce, echoed in the ID token


@dataclass(frozen=True)
class DeviceAuthorization:
    """One device authorization request (RFC 8628) through its states."""

    device_code_hash: str
    user_code: str  # normalised: upper case, no separator
    client_id: str
    resource: str
    scope: str
    expires_at: float
    interval: float
    status: str  # pending | approved | denied | redeemed
    grant_id: str = ""  # once approved
    wrapped_key: bytes = b""  # once approved: the grant's session key wrapped under the device code
    last_poll_at: float = 0.0
    requested_at: float = 0.0  # when and from where the device asked: shown on the confirmation page
    requested_from: str = ""


@dataclass(frozen=True)
class IssuedTokens:
    """What the token endpoint answers (RFC 6749 5.1); the refresh token rotates at every use."""

    access_token: str
    refresh_token: str
    expires_in: int
    scope: str
    resource: str
    id_token: str = ""  # when the scope has openid (``id_token.py``)
