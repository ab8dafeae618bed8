"""CORS for the endpoints a browser-based OAuth client calls with ``fetch()`` from its own origin.

An MCP client running in a web page (the MCP Inspector's direct connection, a web IDE) discovers the server
(RFC 9728 and RFC 8414 metadata, the JWKS), registers (RFC 7591), redeems and refreshes at the token endpoint
and revokes (RFC 7009) from another origin. None of these endpoints reads a cookie: the client proves itself
with what it sends (client credentials, a PKCE verifier, a refresh token), so their answers may be read by
any origin. They get ``Access-Control-Allow-Origin: *`` and never ``Access-Control-Allow-Credentials``: with
the wildcard a browser neither sends cookies nor hands a credentialed answer to the page, so opening them
cannot lend a visitor's session to another site.

The pages a person uses (authorize, consent, device, grants, account) and every endpoint that reads the
session cookie are never opened: they are reached by navigation and form posts, not by ``fetch()``.

On a ``--oauth-resource`` path (``resource.py`` asks): the preflight, which never carries a token, is answered
here, and the sidecar's own 401 is made readable to a page (``WWW-Authenticate`` carries
``resource_metadata``); the app's answers keep the app's own CORS headers.

A preflight is answered only for a method the endpoint serves and for request headers that are plain
header names (``Authorization`` must be named, the ``*`` wildcard does not cover it); otherwise it gets no
CORS header at all and the browser refuses the call.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from multidict import CIMultiDict

WebHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_AGE = "600"  # seconds a browser may keep a preflight's answer (Chromium caps it at 7200)
EXPOSED = "WWW-Authenticate, Retry-After"  # the 401 challenge of the token endpoint and rate limits' wait
MAX_REQUEST_HEADERS = 20  # names in one Access-Control-Request-Headers; more is not a real client
MAX_HEADER_LIST = 1000  # characters of that list
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 field name
# never asked for by a legitimate client, and a header a page must not be able to set on our requests
_REFUSED_HEADERS = frozenset({"cookie", "cookie2", "set-cookie", "host", "origin", "referer"})

SIMPLE = {  # headers that every answer of an open endpoint carries, whether or not Origin was sent
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": EXPOSED,
}


def allowed_headers(requested: str) -> str | None:
    """The ``Access-Control-Request-Headers`` list, lower-cased, when every entry is a plain header name;
    None when the list is malformed, too long or names a header no client of ours sends."""
    if len(requested) > MAX_HEADER_LIST:
        return None
    names = [part.strip().lower() for part in requested.split(",") if part.strip()]
    if len(names) > MAX_REQUEST_HEADERS:
        return None
    if any(not _TOKEN.fullmatch(name) or name in _REFUSED_HEADERS for name in names):
        return None
    return ", ".join(dict.fromkeys(names))


def preflight_headers(request: web.Request, methods: Iterable[str]) -> dict[str, str] | None:
    """The headers that approve a CORS preflight for ``methods``, or None to refuse it (the browser then
    never sends the real request). The method is compared case-sensitively, as browsers send it."""
    method = request.headers.get("Access-Control-Request-Method", "")
    if "Origin" not in request.headers or method not in methods:
        return None
    headers = {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": ", ".join(methods),
        "Access-Control-Max-Age": MAX_AGE,
    }
    requested = request.headers.getall("Access-Control-Request-Headers", [])
    if requested:
        allowed = allowed_headers(",".join(requested))
        if allowed is None:
            return None
        if allowed:
            headers["Access-Control-Allow-Headers"] = allowed
    return headers


def preflight(methods: tuple[str, ...]) -> WebHandler:
    """The ``OPTIONS`` handler of an open endpoint: 204 with the approval, or 204 without any CORS header
    when the preflight asks for what the endpoint does not do (an ``OPTIONS`` without ``Origin`` is a plain
    question about the methods: ``Allow``)."""
    allow = ", ".join(("OPTIONS", *methods))

    async def answer(request: web.Request) -> web.StreamResponse:
        headers = preflight_headers(request, methods) or {}
        return web.Response(status=204, headers={"Allow": allow, "Cache-Control": "no-store", **headers})

    return answer


def open_to_any_origin(handler: WebHandler) -> WebHandler:
    """``handler``'s answers (errors raised as ``web.HTTPException`` included) readable by any origin, without
    credentials. Wraps the ``guarded`` handler, so the 429, 503 and other error answers carry it too."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            _add(exc.headers)
            raise
        if not response.prepared:
            _add(response.headers)
        return response

    wrapped.__name__ = getattr(handler, "__name__", "handler")
    return wrapped


def _add(headers: CIMultiDict[str]) -> None:
    headers.update(SIMPLE)
    headers.popall("Access-Control-Allow-Credentials", None)


def add_routes(router: web.UrlDispatcher, path: str, handlers: dict[str, WebHandler]) -> None:
    """Register ``handlers`` (method -> guarded handler) at ``path``, each open to any origin, and the
    ``OPTIONS`` preflight for exactly those methods."""
    for method, handler in handlers.items():
        if method == "GET":
            router.add_get(path, open_to_any_origin(handler))  # and HEAD, as before
        else:
            router.add_route(method, path, open_to_any_origin(handler))
    router.add_route("OPTIONS", path, preflight(tuple(handlers)))


# --- the resource paths (--oauth-resource) ------------------------------------------------------------------

RESOURCE_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def resource_preflight(request: web.Request) -> web.Response | None:
    """The answer to a CORS preflight on a resource path, which reaches the guard unauthenticated (a browser
    never sends credentials with one): without it no browser-based client could even get the 401 that starts
    its OAuth flow. None when ``request`` is not a preflight. What the app's own answers let a page read
    stays the app's decision (its ``Access-Control-Allow-Origin``); an operator who wants the app to answer
    preflights too lets ``OPTIONS`` through with ``--skip-auth-route``."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    headers = preflight_headers(request, RESOURCE_METHODS) or {}
    return web.Response(status=204, headers={"Cache-Control": "no-store", "Vary": "Origin", **headers})


def challenge_headers(request: web.Request) -> dict[str, str]:
    """Added to the sidecar's own 401 on a resource path when a page's script asked (``Origin``): the client
    must read ``WWW-Authenticate`` to find ``resource_metadata``. Nothing is readable with credentials."""
    if "Origin" not in request.headers:
        return {}
    return {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "WWW-Authenticate", "Vary": "Origin"}
