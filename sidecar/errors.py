"""One exception hierarchy for the whole sidecar.

Lower layers (store, oidc, cookies, crypto) wrap what their libraries raise
into these classes (``raise ... from exc``); only the web layer turns them
into HTTP statuses. Messages never carry tokens, cookies or secrets.

    SidecarError
    ├── ConfigError                  bad or missing setting (exit code 2)
    ├── BadRequest                   malformed client input -> 400
    │   ├── InvalidCookie            forged, tampered, expired or oversized cookie
    │   └── InvalidState             missing, foreign, reused or expired sign-in state
    ├── StoreError                   the session store failed
    │   ├── StoreUnavailable         transient: Redis down or slow -> 503, session kept
    │   └── VersionConflict          compare-and-set lost to a newer write
    ├── ProviderError                the identity provider failed
    │   ├── ProviderUnavailable      transient: network, 5xx, unknown signing key -> 503, session kept
    │   │   └── ProviderTimeout      the provider did not answer in --provider-timeout -> 504, session kept
    │   ├── ProviderProtocolError    an answer we cannot use (token response not JSON, no access_token) -> 502
    │   ├── ProviderRefused          a token-endpoint refusal other than invalid_grant (RFC 6749 5.2): backs off
    │   │                            -> token served while valid, then sign in again (see refresh.py)
    │   ├── InvalidGrant             the grant is dead (invalid_grant) -> session deleted
    │   └── TokenValidationError     an ID token failed validation -> sign-in refused
    ├── SessionGone                  the session ended (signed out, expired, grant dead) -> 401
    └── RefreshBusy                  waited too long for another refresh -> 503
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """A setting is missing or wrong; start-up stops with one line naming it."""


class BadRequest(SidecarError):
    """The client sent something malformed; answered with 400."""


class InvalidCookie(BadRequest):
    """A cookie failed its signature check, expired, or does not parse."""


class InvalidState(BadRequest):
    """The OAuth ``state`` is missing, unknown, already used or expired."""


class StoreError(SidecarError):
    """The session store failed."""


class StoreUnavailable(StoreError):
    """The store could not be reached; nobody is signed out because of it."""


class VersionConflict(StoreError):
    """A compare-and-set write found a newer version than the one it read."""


class ProviderError(SidecarError):
    """The identity provider failed or answered with an error."""

    def __init__(self, message: str, *, error_code: str | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code


class ProviderUnavailable(ProviderError):
    """Network error, 5xx or timeout: transient, retry later, keep the session. ``retry_after``: seconds the
    provider asked us to wait (its ``Retry-After``), said again to our own client; None when it named none."""

    def __init__(self, message: str, *, error_code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, error_code=error_code)
        self.retry_after = retry_after


class ProviderTimeout(ProviderUnavailable):
    """The provider did not answer in time; the request may or may not have been processed."""


class ProviderProtocolError(ProviderError):
    """The provider answered, but with something that breaks the protocol (a malformed token response)."""


class ProviderRefused(ProviderError):
    """The token endpoint refused the request with an error other than ``invalid_grant``.

    ``permanent``: the grant can never be used again (``invalid_scope``), so the session record goes.
    ``misconfigured``: the error points at this client's registration or credentials
    (``invalid_client``, ``unauthorized_client``, ``unsupported_grant_type``, a bare 401); an
    operator must act, and the record is kept so that fixing the configuration revives it."""

    def __init__(
        self, message: str, *, error_code: str | None = None, permanent: bool = False, misconfigured: bool = False
    ) -> None:
        super().__init__(message, error_code=error_code)
        self.permanent = permanent
        self.misconfigured = misconfigured


class InvalidGrant(ProviderError):
    """The provider says the grant is dead; the session cannot be refreshed."""


class TokenValidationError(ProviderError):
    """An ID token (or token response) failed validation."""


class RefreshBusy(SidecarError):
    """Waited longer than allowed for another request's refresh to finish."""


class SessionGone(SidecarError):
    """The session no longer exists or can no longer be used: the user must sign in again."""
