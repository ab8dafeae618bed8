"""Identity headers: build the ones the sidecar sets, strip every client copy of them.

Header names are compared after lower-casing and turning ``_`` into ``-``,
because some servers and frameworks treat ``X_Auth_Request_User`` as
``X-Auth-Request-User``: a client must not be able to forge either spelling.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .models import Identity, Session

MAX_GROUPS_HEADER = 4096

_PROTECTED_PREFIXES = ("x-auth-request-",)
_PROTECTED = frozenset(
    {
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-forwarded-preferred-username",
        "x-forwarded-access-token",
        "authorization",
        "x-user",
        "x-email",
    }
)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    }
)


def is_protected(name: str) -> bool:
    """True for any spelling of a header the sidecar owns."""
    norm = name.lower()
    if "_" in norm:
        norm = norm.replace("_", "-")
    return norm in _PROTECTED or norm.startswith(_PROTECTED_PREFIXES)


def join_groups(groups: Iterable[str]) -> str:
    """Comma-joined groups, cut at a group boundary so a huge list never breaks the response."""
    out: list[str] = []
    size = 0
    for group in groups:
        if "," in group:
            continue  # a comma would split it into two groups downstream
        size += len(group) + 1
        if size > MAX_GROUPS_HEADER:
            break
        out.append(group)
    return ",".join(out)


def _identity_values(identity: Identity) -> dict[str, str]:
    return {
        "User": identity.user,
        "Email": identity.email,
        "Groups": join_groups(identity.groups),
        "Preferred-Username": identity.preferred_username,
    }


def _safe(value: str) -> str:
    return "".join(ch for ch in value if " " <= ch != "\x7f")


def auth_response_headers(session: Session, config: Any) -> dict[str, str]:
    """Headers on a 202 from /oauth2/auth, for nginx auth_request_set / ingress auth-response-headers."""
    headers: dict[str, str] = {}
    if config.set_xauthrequest:
        for suffix, value in _identity_values(session.identity).items():
            if value:
                headers["X-Auth-Request-" + suffix] = value
        if config.pass_access_token:
            headers["X-Auth-Request-Access-Token"] = _safe(session.tokens.access_token)
    if config.pass_authorization_header:
        headers["Authorization"] = "Bearer " + _safe(session.tokens.access_token)
    return headers


_Memo = dict[int, tuple[Session, dict[str, str]]]
_auth_memo: _Memo = {}
_upstream_memo: _Memo = {}


def _memoised(memo: _Memo, build: Any, session: Session, config: Any) -> dict[str, str]:
    """Headers built once per session object: a cached session answers many requests."""
    hit = memo.get(id(session))
    if hit is not None and hit[0] is session:
        return hit[1]
    if len(memo) >= 10_000:
        memo.clear()
    headers: dict[str, str] = build(session, config)
    memo[id(session)] = (session, headers)
    return headers


def auth_response_headers_for(session: Session, config: Any) -> dict[str, str]:
    return _memoised(_auth_memo, auth_response_headers, session, config)


def upstream_identity_headers_for(session: Session, config: Any) -> dict[str, str]:
    return _memoised(_upstream_memo, upstream_identity_headers, session, config)


def upstream_identity_headers(session: Session, config: Any) -> dict[str, str]:
    """Headers added to a request the sidecar proxies to the app itself."""
    headers: dict[str, str] = {}
    values = _identity_values(session.identity)
    if config.pass_user_headers:
        for suffix, value in values.items():
            if value:
                headers["X-Forwarded-" + suffix] = value
    if config.pass_access_token:
        headers["X-Forwarded-Access-Token"] = _safe(session.tokens.access_token)
    headers.update(auth_response_headers(session, config))
    return headers
