"""What a proxied request carries upstream, and what of the upstream's answer goes back.

Hop-by-hop headers are dropped both ways, identity headers are the sidecar's alone, the sidecar's own
cookies and tokens never reach the app. Kept apart from ``proxy.py`` (sign-in check, streaming) so the rule
of what is forwarded is read in one place, and from ``upstream_client.py``, which only sends what it is given.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .config import Config
from .context import BY_SIDECAR_TOKEN
from .cookies import without_sidecar_cookies
from .headers import HOP_BY_HOP, PROTECTED_PREFIX, holds_sidecar_token, refused_from_client

# Expect is answered here (aiohttp's 100 Continue); forwarded, the upstream client waited for the upstream's own 100,
# and one that reads the body without sending it (RFC 9110 10.1.1) hung the request. nginx drops it too.
_NOT_FORWARDED = HOP_BY_HOP | {"content-length", "host", "expect"}
# By the flags of refused_from_client: what is never forwarded, hop-by-hop and sidecar-owned names together.
_NEVER_FORWARDED = {
    flags: _NOT_FORWARDED | refused_from_client(*flags)
    for flags in ((a, t, s) for a in (False, True) for t in (False, True) for s in (False, True))
}
_NOTHING: frozenset[str] = frozenset()


class Forwarded(CIMultiDict[str]):
    """The headers of one proxied request as ``forward_headers`` builds them: ``Host`` first, and every name
    once (a name the client repeats, in any spelling, is one field line, joined as RFC 9110 5.3 allows).

    What aiohttp's client does with a header mapping, two Python loops over every header (one to merge the
    session's defaults, one to put ``Host`` first), then gives exactly a copy of it; ``upstream_client``
    copies one of these in a single C call instead (about 4 % of a proxied request's instructions)."""

    __slots__ = ()


def forward_headers(
    request: web.Request,
    config: Config,
    identity: Mapping[str, str],
    *,
    trusted: bool,
    skipped: bool,
    forwarded_for: str,
    scheme: str,
    host: str,
    app_cookie: str | None = None,
) -> Forwarded:
    """The client's headers the app may see (not hop-by-hop, not the sidecar's own, not its cookies), then
    the sidecar's: ``identity``, ``X-Forwarded-For``/``-Proto``/``-Host``; ``Host`` is the client's.

    The names are checked with set lookups (``headers.refused_from_client``), not a function call per header:
    a name is dropped when its lower-case form is hop-by-hop or framing, listed in ``Connection`` or the sidecar's,
    or when its form with ``_`` and ``.`` as ``-`` is (``Transfer_Encoding``, ``X.Forwarded.User``). ``app_cookie``:
    the request's one Cookie header as the app sees it, already known (the decision cache keeps it beside the
    session)."""
    headers = request.headers
    connection = headers.getall("Connection", ())  # every Connection line lists names (RFC 9110 7.6.1)
    listed = {h.strip().lower() for line in connection for h in line.split(",")} if connection else _NOTHING
    # The client's Authorization is dropped when the sidecar sets its own, and when it held a sidecar-issued
    # token (no token passthrough: MCP authorization, "Token Passthrough"); only a request with an Authorization
    # header can have held one, and without one the flag changes nothing (no request-state lookup then).
    authorization = bool(config.pass_authorization_header) or (
        "Authorization" in headers and request.get(BY_SIDECAR_TOKEN, False)
    )
    never = _NEVER_FORWARDED[(authorization, trusted, skipped)]
    cookie_name = config.cookie_name
    out = Forwarded()
    out["Host"] = request.host  # the client's: apps build links and compare Origin with it
    for name, value in headers.items():
        low = name.lower()
        if low in never or low in listed:
            continue
        if "_" in low or "." in low:
            # X_Auth_Request_User reads as X-Auth-Request-User in CGI/WSGI servers, X.Auth.Request.User in PHP
            # (its $_SERVER names fold "." into "_"); Transfer_Encoding read as framing there: a smuggled request
            low = low.replace("_", "-").replace(".", "-")
            if low in never or low in listed:
                continue
        if low.startswith(PROTECTED_PREFIX):
            continue
        if low == "authorization" and holds_sidecar_token(value):
            continue  # a sidecar token never reaches the app, on any path (the cookie may have authenticated)
        if low == "cookie":
            if cookie_name in value:
                value = without_sidecar_cookies(value, cookie_name) if app_cookie is None else app_cookie
                if not value:
                    continue
            # several Cookie headers (any spelling) go as one joined by "; " (RFC 9113 8.2.3), never ", "
            if "Cookie" in out:
                out["Cookie"] = out["Cookie"] + "; " + value
            else:
                out.add("Cookie", value)
            continue
        if name in out:  # any spelling: one field line, values in the order sent
            out[name] = out[name] + ", " + value
        else:
            out.add(name, value)
    length = request.content_length
    if length is not None:
        out.add("Content-Length", str(length))
    out.update(identity)  # set, not added: whatever a client sent under these names is gone either way
    out["X-Forwarded-For"] = forwarded_for
    out["X-Forwarded-Proto"] = scheme
    out["X-Forwarded-Host"] = host
    return out


def answer_headers(upstream: aiohttp.ClientResponse) -> Mapping[str, str] | list[tuple[str, str]]:
    """The upstream's response headers without hop-by-hop ones and those its ``Connection`` lists (a
    hop-by-hop name, so the common answer, with none of them, is passed on as it is: one check per name)."""
    headers = upstream.headers
    if HOP_BY_HOP.isdisjoint(map(str.lower, headers.keys())):
        return headers
    listed = {h.strip().lower() for line in headers.getall("Connection", ()) for h in line.split(",")}
    dropped = HOP_BY_HOP | listed  # every Connection line lists names (RFC 9110 7.6.1), as on the request side
    return [(name, value) for name, value in headers.items() if name.lower() not in dropped]
