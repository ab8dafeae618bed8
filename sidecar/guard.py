"""Decide who a request belongs to: cookie -> session -> fresh tokens -> allowed or not.

Shared by ``/oauth2/auth``, ``/oauth2/userinfo`` and the reverse proxy, so all
three see exactly the same rules.
"""

from __future__ import annotations

import ipaddress
import time
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from aiohttp import web

from .config import Config
from .context import AUTHED, Services, services, view_of
from .cookies import SessionRef
from .errors import InvalidCookie, SessionGone
from .models import Session
from .policy import is_allowed


def read_cookie(request: web.Request, name: str) -> str | None:
    """One cookie's value. Cheaper than parsing every cookie into Morsels on each request."""
    header = request.headers.get("Cookie")
    if not header or name not in header:
        return None
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            return value.strip()
    return None


async def authenticate(request: web.Request, svc: Services) -> tuple[SessionRef, Session]:
    """The request's session with a usable access token; raises SessionGone when not signed in."""
    cookie = read_cookie(request, svc.config.cookie_name)
    if not cookie:
        raise SessionGone("no session cookie")
    try:
        ref = svc.codec.load_session(cookie, time.time())
        session = await svc.sessions.load(ref)
    except InvalidCookie as exc:
        # A forged, re-signed or stale cookie is simply "not signed in".
        raise SessionGone(str(exc)) from exc
    session = await svc.refresher.fresh(ref, session)
    if svc.config.request_logging:  # only the access log line reads it
        request[AUTHED] = (ref, session)
    return ref, session


async def authorize(request: web.Request, svc: Services) -> tuple[SessionRef, Session]:
    """Like ``authenticate`` but also applies the email-domain and group rules (403)."""
    ref, session = await authenticate(request, svc)
    if not is_allowed(session.identity, svc.config):
        raise web.HTTPForbidden(text="403 Forbidden: your account is not allowed here\n")
    return ref, session


def wants_html(request: web.Request) -> bool:
    return request.method in ("GET", "HEAD") and "text/html" in request.headers.get("Accept", "")


def sign_in_redirect(request: web.Request) -> web.Response:
    """Browsers go to sign in and come back to where they were; API clients get 401."""
    config = services(request).config
    if wants_html(request):
        rd = quote(request.rel_url.raw_path_qs, safe="/?=&%:@!$'()*+,;~-._")
        return web.Response(status=302, headers={"Location": f"/oauth2/start?rd={quote(rd, safe='')}"})
    response = web.Response(status=401, text="401 Unauthorized: sign in first\n")
    response.headers["WWW-Authenticate"] = 'Cookie realm="sidecar"'
    if request.cookies.get(config.cookie_name):
        clear_session_cookie(response, config)
    return response


def _cookie_attributes(config: Any) -> dict[str, Any]:
    return {
        "path": config.cookie_path,
        "domain": config.cookie_domain or None,
        "secure": config.cookie_secure,
        "httponly": config.cookie_httponly,
        "samesite": config.cookie_samesite.capitalize() or None,
    }


def set_cookie(response: web.StreamResponse, config: Any, name: str, value: str, max_age: float) -> None:
    """Our cookies all carry the configured attributes (HttpOnly, Secure, SameSite=Lax by default)."""
    response.set_cookie(name, value, max_age=int(max_age), **_cookie_attributes(config))


def clear_cookie(response: web.StreamResponse, config: Any, name: str) -> None:
    response.del_cookie(name, **_cookie_attributes(config))


def clear_session_cookie(response: web.StreamResponse, config: Any) -> None:
    clear_cookie(response, config, config.cookie_name)


def absolute(request: web.Request, path: str) -> str:
    """An absolute URL on the host the client used (for post-logout redirects)."""
    if path.startswith(("http://", "https://")):
        return path
    view = view_of(request)
    return f"{view.scheme}://{view.host}{path}"


TOKEN_HEADERS = frozenset({"X-Auth-Request-Access-Token", "Authorization"})


@lru_cache(maxsize=1024)
def _peer_in(remote: str | None, networks: tuple[Any, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    return any(addr in net for net in networks)


def tokens_allowed(request: web.Request, config: Config) -> bool:
    """May this ``/oauth2/auth`` answer carry the access token?

    Only to a front the operator named (the socket peer is in ``--trusted-proxy``: nginx or the
    ingress controller asking in its auth subrequest), and never when the sidecar proxies the app
    itself (``--upstream``): there the app gets its tokens on the proxied request, and
    ``/oauth2/auth`` is reachable by the page's own scripts, which must not read tokens. Request
    headers cannot decide this: nginx copies the browser's headers (``Sec-Fetch-*`` too) into
    its subrequest."""
    return not config.upstreams and _peer_in(request.remote, config.trusted_networks)
