"""Decide who a request belongs to: cookie -> session -> fresh tokens -> allowed or not.

Shared by ``/oauth2/auth``, ``/oauth2/userinfo`` and the reverse proxy, so all
three see exactly the same rules.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from aiohttp import hdrs, web
from multidict import CIMultiDictProxy

from . import logs
from .bearer import bearer_token, invalid_token
from .config import Config
from .context import AUTHED, BY_SIDECAR_TOKEN, SERVICES, Services, services, trusted_peer, view_of
from .cookies import WSP, SessionRef, cookie_domain_for
from .errors import InvalidCookie, SessionGone
from .models import Session
from .policy import why_denied

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
COOKIE = hdrs.COOKIE  # an istr: looked up without lower-casing the name on each request


def read_cookie(request: web.Request, name: str) -> str | None:
    """One cookie's value, the first one of that name in the request's Cookie headers joined as RFC 9113
    8.2.3 says (``cookie_header``). Cheaper than parsing every cookie into Morsels on each request: when
    the first header holds the cookie, no later header can come before it, so only that one is read."""
    header = request.headers.get(COOKIE)
    if header is None:
        return None  # no Cookie header at all
    if name in header:
        for part in header.split(";"):  # inline, not _crumb: this is every request's case
            key, sep, value = part.partition("=")
            if sep and key.strip(WSP) == name:
                return value.strip(WSP)
    joined = cookie_header(request.headers)
    return None if joined is None or joined is header or name not in joined else _crumb(joined, name)


def cookie_header(headers: CIMultiDictProxy[str]) -> str | None:
    """Every ``Cookie`` header as one, joined by "; " (RFC 9113 8.2.3: an HTTP/2 client may send each cookie
    as a header of its own, and some fronts pass them on so); None without any. One header comes back as is."""
    values = headers.getall(COOKIE, ())
    if len(values) == 1:
        return values[0]
    return "; ".join(values) if values else None


def request_cookies(request: web.Request) -> dict[str, str]:
    """Every cookie of the request by name (the first of a name wins, as for ``read_cookie``), across all its
    Cookie headers. For the few places that look at several of the sidecar's cookies (sign-in attempts)."""
    found: dict[str, str] = {}
    for part in (cookie_header(request.headers) or "").split(";"):
        key, sep, value = part.partition("=")
        if sep:
            found.setdefault(key.strip(WSP), value.strip(WSP))
    return found


def _crumb(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip(WSP) == name:
            return value.strip(WSP)
    return None


BEARER_REF = SessionRef(sid="", key=b"")  # a bearer-token request has no stored session behind it


async def authenticate(request: web.Request, svc: Services) -> tuple[SessionRef, Session]:
    """The request's session with a usable access token; raises SessionGone when not signed in.

    With ``--skip-jwt-bearer-tokens`` a request carrying ``Authorization: Bearer`` is judged by that
    token alone (``bearer.py``): valid, it is who the token names; invalid, a 401 ``invalid_token``.
    The cookie is not consulted then, so a bad token never quietly turns into someone's session.
    With ``--oauth-server`` a token the sidecar issued is judged first, on its resource paths only."""
    if svc.resource_guard is not None:
        found = await svc.resource_guard.authenticate(request)
        if found is not None:
            request[BY_SIDECAR_TOKEN] = True
            if svc.config.request_logging:
                request[AUTHED] = found
            return found
    if svc.bearer is not None:
        token = bearer_token(request)
        if token is not None:
            if not token:
                raise invalid_token()
            session = await svc.bearer.session_for(token)
            if svc.config.request_logging:
                request[AUTHED] = (BEARER_REF, session)
            return BEARER_REF, session
    cookie = read_cookie(request, svc.config.cookie_name)
    if not cookie:
        raise SessionGone("no session cookie")
    try:
        ref = svc.codec.load_session(cookie, time.time())
        session = await svc.sessions.load(ref)
    except InvalidCookie as exc:
        # A forged, re-signed or stale cookie is simply "not signed in".
        _log_refused_cookie(request, str(exc))
        raise SessionGone(str(exc)) from exc
    except SessionGone as exc:
        _log_refused_cookie(request, str(exc))
        raise
    session = await svc.refresher.fresh(ref, session)
    if svc.config.request_logging:  # only the access log line reads it
        request[AUTHED] = (ref, session)
    return ref, session


def _log_refused_cookie(request: web.Request, detail: str) -> None:
    """A cookie we would not accept: bad signature, expired, malformed, or a session the store no longer has."""
    logs.event("cookie_refused", {"reason": detail, "client_ip": view_of(request).client_ip})


async def authorize(request: web.Request, svc: Services) -> tuple[SessionRef, Session]:
    """Like ``authenticate`` but also applies the email-domain and group rules (403)."""
    ref, session = await authenticate(request, svc)
    denied = why_denied(session.identity, svc.config)
    if denied is not None:
        fields = {**logs.who(session.identity), "reason": denied, "route": request.path[:200]}
        logs.event("denied", {**fields, "client_ip": view_of(request).client_ip})
        request[AUTHED] = (ref, session)  # the access-denied page names the account
        raise web.HTTPForbidden(text="403 Forbidden: your account is not allowed here\n")
    return ref, session


def wants_html(request: web.Request) -> bool:
    return request.method in ("GET", "HEAD") and "text/html" in request.headers.get("Accept", "")


def sign_in_redirect(request: web.Request) -> web.Response:
    """Browsers go to sign in and come back to where they were; API clients get 401."""
    svc = services(request)
    config = svc.config
    if svc.resource_guard is not None:
        challenge = svc.resource_guard.challenge(request)
        if challenge is not None:
            return challenge
    if wants_html(request) and not is_api_route(request, config):
        rd = quote(request.rel_url.raw_path_qs, safe="/?=&%:@!$'()*+,;~-._")
        location = f"{config.proxy_prefix}/start?rd={quote(rd, safe='')}"
        return web.Response(status=302, headers={"Location": location})
    response = web.Response(status=401, text="401 Unauthorized: sign in first\n")
    response.headers["WWW-Authenticate"] = 'Cookie realm="sidecar"'
    if read_cookie(request, config.cookie_name):
        clear_session_cookie(response, config)
    return response


def is_api_route(request: web.Request, config: Config) -> bool:
    """``--api-route``: paths whose clients are programs (a page's fetch sends Accept: text/html too), so
    an unauthenticated request there gets 401, never a sign-in redirect it could not follow."""
    path = request.path
    return any(pattern.search(path) for pattern in config.api_routes)


def _cookie_attributes(config: Config) -> dict[str, Any]:
    """The Domain attribute is filled in per request by ``apply_cookie_domain`` (the host decides it)."""
    return {
        "path": config.cookie_path,
        "domain": None,
        "secure": config.cookie_secure,
        "httponly": config.cookie_httponly,
        "samesite": config.cookie_samesite.capitalize() or None,
    }


def set_cookie(response: web.StreamResponse, config: Config, name: str, value: str, max_age: float) -> None:
    """Our cookies all carry the configured attributes (HttpOnly, Secure, SameSite=Lax by default)."""
    response.set_cookie(name, value, max_age=int(max_age), **_cookie_attributes(config))


def clear_cookie(response: web.StreamResponse, config: Config, name: str) -> None:
    response.del_cookie(name, **_cookie_attributes(config))


def clear_session_cookie(response: web.StreamResponse, config: Config) -> None:
    clear_cookie(response, config, config.cookie_name)


@web.middleware
async def cookie_domain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Installed only with ``--cookie-domain``: every cookie the sidecar sets or clears gets the Domain for
    this request's host (the longest listed domain the host falls under; none: host-only), so sign-in,
    sign-out and attempt cookies always agree on it. Proxied responses pass their own Set-Cookie
    headers through untouched (those are not in ``response.cookies``)."""
    response = await handler(request)
    if response.cookies:
        domain = cookie_domain_for(request.app[SERVICES].config.cookie_domains, view_of(request).host)
        for morsel in response.cookies.values():
            morsel["domain"] = domain or ""
    return response


def callback_url(request: web.Request, config: Config) -> str:
    """The redirect_uri of a sign-in started by this request: ``--redirect-url`` as configured, or for a
    relative one (``/oauth2/callback``: one sidecar serving several hosts) that path on the scheme and
    host the browser used, as ``view_of`` sees them (X-Forwarded-* only from trusted proxies)."""
    return absolute(request, config.redirect_url)


def absolute(request: web.Request, path: str) -> str:
    """An absolute URL on the host the client used (for post-logout redirects)."""
    if path.startswith(("http://", "https://")):
        return path
    view = view_of(request)
    return f"{view.scheme}://{view.host}{path}"


TOKEN_HEADERS = frozenset({"X-Auth-Request-Access-Token", "Authorization"})


def tokens_allowed(request: web.Request, config: Config) -> bool:
    """May this ``/oauth2/auth`` answer carry the access token?

    Only to a front the operator named (``--reverse-proxy`` on and the socket peer in
    ``--trusted-proxy``: nginx or the ingress controller asking in its auth subrequest), and never
    when the sidecar proxies the app itself (``--upstream``): there the app gets its tokens on the proxied request, and
    ``/oauth2/auth`` is reachable by the page's own scripts, which must not read tokens. Request
    headers cannot decide this: nginx copies the browser's headers (``Sec-Fetch-*`` too) into
    its subrequest."""
    return not config.upstreams and trusted_peer(request.remote, config)


async def browser_session(request: web.Request, svc: Services) -> tuple[SessionRef, Session] | None:
    """The browser's own session (the cookie, as ``authenticate`` reads it); None when not signed in. A bearer
    token never counts here: the account, consent, device and grants pages act for a person in a browser."""
    cookie = read_cookie(request, svc.config.cookie_name)
    if not cookie:
        return None
    try:
        ref = svc.codec.load_session(cookie, time.time())
        return ref, await svc.sessions.load(ref)
    except (InvalidCookie, SessionGone):
        return None
