"""Identity headers: build the ones the sidecar sets, strip every client copy of them.

Header names are compared after lower-casing and turning ``_`` into ``-``,
because some servers and frameworks treat ``X_Auth_Request_User`` as
``X-Auth-Request-User``: a client must not be able to forge either spelling.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .config import Config
from .models import Identity, Session

MAX_GROUPS_HEADER = 4096

_PROTECTED_PREFIXES = ("x-auth-request-",)
# Identity headers: whatever a client sends under these names never reaches the app.
_PROTECTED = frozenset(
    {
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-forwarded-preferred-username",
        "x-forwarded-access-token",
        "x-user",
        "x-email",
    }
)
# Set by the sidecar itself from what it saw, so a client's copy is always replaced.
_REWRITTEN = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
# What a proxy in front says about the client: believed only from a trusted proxy.
_FROM_PROXIES = frozenset(
    {"forwarded", "x-real-ip", "x-forwarded-port", "x-forwarded-prefix", "x-forwarded-server", "x-forwarded-scheme"}
)
# Headers that make some frameworks (Symfony, IIS, Zend) serve another path than the request line's:
# the skip-auth rules never saw that path, so nobody may send them.
_PATH_OVERRIDES = frozenset({"x-original-url", "x-rewrite-url"})
# Headers that make some frameworks treat a GET as another method; a method-limited skip-auth rule
# (``GET=^/public/``) would otherwise let an unauthenticated DELETE through.
_METHOD_OVERRIDES = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
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
MAX_VALUE = 4096  # an identity value longer than this is left out rather than cut into another value
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _norm(name: str) -> str:
    norm = name.lower()
    return norm.replace("_", "-") if "_" in norm else norm


def is_protected(name: str, *, authorization: bool = True) -> bool:
    """True for any spelling of a header the sidecar owns. ``Authorization`` is the sidecar's only
    when it sets one (``--pass-authorization-header``): otherwise the client's own reaches the app."""
    norm = _norm(name)
    if norm == "authorization":
        return authorization
    return norm in _PROTECTED or norm.startswith(_PROTECTED_PREFIXES)


def dropped_from_client(name: str, *, authorization: bool, trusted_peer: bool, skipped: bool) -> bool:
    """True when a client's header must not be forwarded to the app.

    ``authorization``: the sidecar sets its own. ``trusted_peer``: the peer is a trusted proxy, whose
    ``Forwarded``/``X-Real-IP``/``X-Forwarded-Port``/``-Prefix`` describe the real client. ``skipped``:
    the request passes unauthenticated through a skip-auth rule, so method overrides are dropped too.
    """
    norm = _norm(name)
    if is_protected(norm, authorization=authorization) or norm in _REWRITTEN or norm in _PATH_OVERRIDES:
        return True
    if norm in _FROM_PROXIES:
        return not trusted_peer
    return skipped and norm in _METHOD_OVERRIDES


PROTECTED_PREFIX = _PROTECTED_PREFIXES[0]


def _refused_names(authorization: bool, trusted_peer: bool, skipped: bool) -> frozenset[str]:
    names = _PROTECTED | _REWRITTEN | _PATH_OVERRIDES
    if authorization:
        names |= {"authorization"}
    if not trusted_peer:
        names |= _FROM_PROXIES
    if skipped:
        names |= _METHOD_OVERRIDES
    return frozenset(names)


_REFUSED = {(a, t, s): _refused_names(a, t, s) for a in (False, True) for t in (False, True) for s in (False, True)}


def refused_from_client(authorization: bool, trusted_peer: bool, skipped: bool) -> frozenset[str]:
    """``dropped_from_client`` as data, for the proxy's per-header loop: a normalised name is dropped when it
    is in this set or starts with ``PROTECTED_PREFIX``. One set per combination of flags, built at import."""
    return _REFUSED[(authorization, trusted_peer, skipped)]


SIDECAR_TOKEN_PREFIXES = ("sca.", "scr.", "scc.")  # tokens the sidecar issues (sidecar.oauth.tokens)
_SIDECAR_TOKEN = re.compile(r"\s*bearer\s+(?:sca|scr|scc)\.", re.IGNORECASE)


def holds_sidecar_token(authorization: str) -> bool:
    """An ``Authorization`` value carrying a token the sidecar issued: never forwarded to an app (MCP
    authorization forbids token passthrough), whatever authenticated the request."""
    return _SIDECAR_TOKEN.match(authorization) is not None


def header_value(value: object) -> str:
    """A claim value as a header value: only strings, without control characters or lone surrogates
    (which cannot be encoded), and empty when longer than ``MAX_VALUE`` (cutting could forge another)."""
    if not isinstance(value, str):
        return ""
    if len(value) > MAX_VALUE * 4:
        return ""
    text = _UNSAFE.sub("", value)
    return text if len(text) <= MAX_VALUE else ""


def join_groups(groups: Iterable[object]) -> str:
    """Comma-joined groups, cut at a group boundary so a huge list never breaks the response.

    A group that is not a string, empty after cleaning, or holds a comma (it would read as two
    groups downstream) is left out."""
    out: list[str] = []
    size = 0
    for raw in groups:
        group = header_value(raw)
        if not group or "," in group:
            continue
        size += len(group) + 1
        if size > MAX_GROUPS_HEADER:
            break
        out.append(group)
    return ",".join(out)


def _identity_values(identity: Identity) -> dict[str, str]:
    return {
        "User": header_value(identity.user),
        "Email": header_value(identity.email),
        "Groups": join_groups(identity.groups),
        "Preferred-Username": header_value(identity.preferred_username),
    }


def _safe(value: str) -> str:
    return _UNSAFE.sub("", value)


def auth_response_headers(session: Session, config: Config) -> dict[str, str]:
    """Headers on a 202 from /oauth2/auth, for nginx auth_request_set / ingress auth-response-headers."""
    headers: dict[str, str] = {}
    if config.set_xauthrequest:
        for suffix, value in _identity_values(session.identity).items():
            if value:
                headers["X-Auth-Request-" + suffix] = value
        if session.auth_time:  # the last interactive sign-in, whole seconds since the epoch: apps decide step-up too
            headers["X-Auth-Request-Auth-Time"] = str(int(session.auth_time))
        if config.pass_access_token:
            headers["X-Auth-Request-Access-Token"] = _safe(session.tokens.access_token)
    if config.pass_authorization_header:
        headers["Authorization"] = "Bearer " + _safe(session.tokens.access_token)
    return headers


def _memoised(name: str, build: Any, session: Session, config: Config) -> dict[str, str]:
    """Headers built once per session object (a cached session answers many requests), kept on the object."""
    headers: dict[str, str] | None = session.derived.get(name)
    if headers is None:
        headers = session.derived[name] = build(session, config)
    return headers


def auth_response_headers_for(session: Session, config: Config) -> dict[str, str]:
    return _memoised("auth_headers", auth_response_headers, session, config)


UPSTREAM_MEMO = "upstream_headers"  # the key of the proxy's identity headers in ``Session.derived``


def upstream_identity_headers_for(session: Session, config: Config) -> dict[str, str]:
    return _memoised(UPSTREAM_MEMO, upstream_identity_headers, session, config)


def upstream_identity_headers(session: Session, config: Config) -> dict[str, str]:
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
