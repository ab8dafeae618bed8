"""Stream a signed-in request to its upstream, and the answer back.

Bodies are streamed both ways (never buffered whole), hop-by-hop headers are
dropped, identity headers are the sidecar's alone, and the sidecar's own
cookies never reach the app (the session cookie holds the record's key).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from urllib.parse import quote

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from . import logs, metrics, pages
from .config import Config, Upstream
from .context import AUTHED, Services, trusted_peer, view_of
from .cookies import SessionRef, without_sidecar_cookies
from .decisions import Decision, Key
from .errors import BadRequest, SessionGone
from .forward import Forwarded, answer_headers, forward_headers
from .guard import BEARER_REF, authorize, is_api_route, read_cookie, sign_in_redirect, wants_html
from .headers import UPSTREAM_MEMO, upstream_identity_headers_for
from .models import Session
from .paths import BadPath as BadPath  # re-exported: callers that read paths as the proxy does import them here
from .paths import normalise_path as normalise_path
from .stepup import is_stale, required_max_age, start_url, unauthorized


async def handle(request: web.Request, svc: Services) -> web.StreamResponse:
    """Catch-all: authenticate (unless a skip-auth rule matches), then proxy."""
    config = svc.config
    path = normalise_path(request.rel_url.raw_path)
    ups = config.upstreams  # one upstream at "/" is the common case: no loop, no call
    upstream = ups[0] if len(ups) == 1 and path.startswith(ups[0].prefix) else _upstream_for(config, path)
    skip = bool(config.skip_routes) and any(rule.matches(request.method, path) for rule in config.skip_routes)
    headers = _NO_HEADERS
    app_cookie: str | None = None  # the Cookie header the app sees, when the decision cache knows it
    if not skip:
        entry = _cached(request, svc)
        if entry is None:
            try:
                ref, session = await authorize(request, svc)
            except SessionGone:
                return sign_in_redirect(request)
            _remember(request, svc, ref, session)
        else:
            session, app_cookie = entry.session, entry.headers.get("Cookie", "")
        max_age = required_max_age(config.fresh_routes, request.method, path) if config.fresh_routes else None
        if max_age is not None and is_stale(session.auth_time, max_age, time.time()):
            return _step_up(request, config, max_age)
        headers = session.derived.get(UPSTREAM_MEMO) or upstream_identity_headers_for(session, config)
    if "Authorization" in request.headers and len(request.headers.getall("Authorization")) > 1:
        # Joined as "a, b" no app reads either, and which one the sidecar judged is a guess: nginx refuses it too.
        # After the check above: where a bearer token decides, its 400 carries RFC 6750's challenge.
        raise BadRequest("more than one Authorization header")
    if upstream is None:
        text = "404 Not Found: no upstream for this path\n"
        return pages.error(request, 404, "Not found", "Nothing is served at this address.", (pages.HOME,), text=text)
    upgrade = request.headers.get("Upgrade")
    websocket = upgrade is not None and _is_websocket(upgrade)
    if websocket:
        _check_handshake(request)  # before any upstream connection is opened
    remote = request.remote
    if trusted_peer(remote, config):
        view = view_of(request)
        trusted, scheme, host = True, view.scheme, view.host
        # every line, as forwarded_client_ip reads them: a front may add its own line after the client's
        prior = ", ".join(request.headers.getall("X-Forwarded-For", ()))
        forwarded_for = f"{prior}, {remote}" if prior else str(remote)
    else:  # what view_of concludes for any other peer, without building the view
        trusted, scheme, host, forwarded_for = False, "https" if request.secure else "http", request.host, str(remote)
    forward = forward_headers(
        request,
        config,
        headers,
        trusted=trusted,
        skipped=skip,
        forwarded_for=forwarded_for,
        scheme=scheme,
        host=host,
        app_cookie=app_cookie,
    )
    query = request.rel_url.raw_query_string
    # encoded=True: the upstream receives exactly the path the skip-auth rules saw (yarl would
    # otherwise re-quote it, e.g. turn %3B into ';').
    url = URL(upstream.url + path + ("?" + query if query else ""), encoded=True)
    if websocket:
        return await _websocket(request, svc, url, forward)
    return await _stream(request, svc, url, forward)


_NO_HEADERS: dict[str, str] = {}
# The second item of a proxied request's decision-cache key; an /oauth2/auth key has at least four items.
_PROXY_KEY = "proxy"


def _upstream_for(config: Config, path: str) -> Upstream | None:
    """The first upstream whose prefix the path is under (or is, without its trailing slash)."""
    for upstream in config.upstreams:
        if path.startswith(upstream.prefix) or path + "/" == upstream.prefix:
            return upstream
    return None


def _session_key(request: web.Request, svc: Services) -> Key | None:
    """The decision-cache key of a proxied request's sign-in check; None when the cookie alone may not decide.

    With no ``Authorization`` header (no bearer token, no token the sidecar issued) ``authorize`` reads nothing
    but the session cookie, so the key is the one Cookie header, whole. As for ``/oauth2/auth``, nothing is
    cached for two Cookie headers or for the session cookie's name twice."""
    headers = request.headers
    if svc.decisions is None or "Authorization" in headers:
        return None
    cookies = headers.getall("Cookie", ())
    if len(cookies) != 1 or cookies[0].count(svc.config.cookie_name + "=") != 1:
        return None
    return (cookies[0], _PROXY_KEY)


def _cached(request: web.Request, svc: Services) -> Decision | None:
    """What a recent request with the same key was allowed with (its session, and the Cookie header its app
    saw), while the decision cache still vouches for it: the same object in the session cache, before its
    refresh is due and before any lifetime, idle or cookie limit; a sign-out, refresh or session end in this
    process drops it at once."""
    key = _session_key(request, svc)
    if key is None:
        return None
    assert svc.decisions is not None
    entry = svc.decisions.get(key)
    if entry is None:
        return None
    if svc.config.request_logging:  # only the access log line reads it
        request[AUTHED] = (entry.ref, entry.session)
    return entry


def _remember(request: web.Request, svc: Services, ref: SessionRef, session: Session) -> None:
    """Keep a cookie's successful check for the next requests with the same key (from the second time the key
    is seen), with the Cookie header the app sees (the key's, without the sidecar's cookies). The step-up age
    is checked per request, so the entry holds none; a token's session is never kept."""
    key = _session_key(request, svc)
    if key is None or svc.decisions is None or ref is BEARER_REF or not svc.decisions.admit(key):
        return
    config = svc.config
    cookie = read_cookie(request, config.cookie_name)
    until = svc.codec.session_valid_until(cookie) if cookie else None
    app_sees = CIMultiDict({"Cookie": without_sidecar_cookies(key[0], config.cookie_name)})
    svc.decisions.put(key, app_sees, ref, session, max_age=None, cookie_until=until, forwarded_ip=None)


def _step_up(request: web.Request, config: Config, max_age: int) -> web.Response:
    """A session whose last sign-in is too old for this route (``--fresh-auth-route``): browsers sign in
    again with ``max_age`` and come back here, other clients get the RFC 9470 401. The session stays."""
    if wants_html(request) and not is_api_route(request, config):
        rd = quote(request.rel_url.raw_path_qs, safe="/?=&%:@!$'()*+,;~-._")
        location = start_url(config.proxy_prefix, max_age, rd)
        return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
    return unauthorized(max_age)


def _is_websocket(upgrade: str) -> bool:
    return "websocket" in {t.strip().lower() for t in upgrade.split(",")}


def _check_handshake(request: web.Request) -> None:
    """RFC 6455 section 4.2.1: a client handshake the sidecar would not accept itself is refused with
    400 here, so a malformed one never costs (or probes) an upstream connection."""
    h = request.headers
    connection = {t.strip().lower() for t in h.get("Connection", "").split(",")}
    if request.method != "GET" or "upgrade" not in connection or h.get("Upgrade", "").strip().lower() != "websocket":
        raise BadRequest("not a WebSocket handshake")
    if h.getall("Sec-WebSocket-Version", []) != ["13"]:
        raise BadRequest("unsupported Sec-WebSocket-Version (13 expected)")
    keys = h.getall("Sec-WebSocket-Key", [])
    try:
        valid = len(keys) == 1 and len(base64.b64decode(keys[0].strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise BadRequest("bad Sec-WebSocket-Key")


def _log_upstream_error(request: web.Request, error: str, url: URL) -> None:
    """The upstream failed (not the user, not the provider): which one, and how. No path, no query string."""
    fields = {"error": error, "upstream": f"{url.scheme}://{url.host}:{url.port}", "route": request.path[:200]}
    logs.event("upstream_error", {**fields, "client_ip": view_of(request).client_ip}, logging.ERROR)


WHOLE_BODY = 64 * 1024  # request and response bodies up to this size go in one piece, larger ones are streamed
CLIENT_GONE_POLL = 1.0  # seconds between looks at a streaming client's connection


async def _request_body(request: web.Request) -> bytes | aiohttp.StreamReader | None:
    """A small body with a declared length, read whole: one send upstream instead of a streamed payload."""
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length <= WHOLE_BODY:
        return await request.read()
    return request.content


async def _stream(request: web.Request, svc: Services, url: URL, headers: Forwarded) -> web.StreamResponse:
    assert svc.upstream_http is not None
    body = await _request_body(request) if request.body_exists else None
    started = time.monotonic()
    try:
        upstream = await svc.upstream_http.request(
            request.method,
            url,
            headers=headers,
            data=body,
            allow_redirects=False,
        )
    except TimeoutError:
        _log_upstream_error(request, "timeout", url)
        return pages.upstream_failed(request, 504, "504 Gateway Timeout: the upstream did not answer in time\n")
    except aiohttp.ClientError as exc:
        _log_upstream_error(request, type(exc).__name__, url)
        return pages.upstream_failed(request, 502, "502 Bad Gateway: the upstream is unreachable\n")
    metrics.UPSTREAM.observe(time.monotonic() - started)
    try:
        length = upstream.content_length
        whole = length is not None and length <= WHOLE_BODY and request.method != "HEAD"
        kind = _WholeAnswer if whole else web.StreamResponse
        response = kind(status=upstream.status, reason=upstream.reason, headers=answer_headers(upstream))
        if length is None and request.method != "HEAD" and upstream.status not in (204, 304):
            response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            if whole:
                await response.write_eof(await upstream.read())  # status line, headers and body in one send
            else:
                watcher = _ClientWatch(request, upstream)
                try:
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                finally:
                    watcher.cancel()
                await response.write_eof()
        except (TimeoutError, aiohttp.ClientError, ConnectionError):
            # The upstream stalled or either side went away mid-body. Headers are gone already, so
            # cutting the connection is the only honest signal left.
            if request.transport is not None:
                request.transport.close()
        return response
    finally:
        if upstream.content.is_eof():
            upstream.release()  # back to the pool for the next request
        else:
            upstream.close()  # half-read: this connection cannot be reused


class _ClientWatch:
    """Close the upstream response once the client has gone.

    aiohttp does not cancel a handler when its client disconnects, and a stream (server-sent events, a
    long poll) only notices at its next write, which a quiet upstream may not make for minutes: the
    upstream connection and its server-side stream would be held for nothing. The transport is looked at
    every ``CLIENT_GONE_POLL`` seconds by a loop timer (no task, no coroutine per stream); small answers
    read whole never start one."""

    __slots__ = ("_request", "_upstream", "_timer")

    def __init__(self, request: web.Request, upstream: aiohttp.ClientResponse) -> None:
        self._request, self._upstream = request, upstream
        self._timer = asyncio.get_running_loop().call_later(CLIENT_GONE_POLL, self._look)

    def _look(self) -> None:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            self._upstream.close()  # the stream's read fails at once: the handler ends
            return
        self._timer = asyncio.get_running_loop().call_later(CLIENT_GONE_POLL, self._look)

    def cancel(self) -> None:
        self._timer.cancel()


class _WholeAnswer(web.StreamResponse):
    """A small answer of known length: its headers wait for the body and leave with it in one write.

    ``StreamResponse`` sends the headers at ``prepare`` (right for streams: the client sees the status at
    once); for a body that is read whole anyway that is one more send per request for nothing."""

    _send_headers_immediately = False


async def _websocket(request: web.Request, svc: Services, url: URL, headers: Forwarded) -> web.StreamResponse:
    """Open the upstream WebSocket (with the client's Host and Origin), then pump messages both ways."""
    assert svc.upstream_http is not None
    for name in [n for n in headers if n.lower().startswith("sec-websocket-")]:
        del headers[name]  # the upstream handshake is the client library's own
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    try:
        upstream = await svc.upstream_http.ws_connect(
            url, headers=headers, protocols=protocols, timeout=aiohttp.ClientWSTimeout(ws_close=10)
        )
    except TimeoutError:
        return web.Response(status=504, text="504 Gateway Timeout: the upstream did not answer in time\n")
    except aiohttp.ClientError:
        return web.Response(status=502, text="502 Bad Gateway: the upstream refused the WebSocket\n")
    client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else ())
    await client.prepare(request)

    async def pump(
        src: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
        dst: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
    ) -> None:
        async for msg in src:
            if msg.type == WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            else:
                break
        await dst.close()

    tasks = [asyncio.ensure_future(pump(client, upstream)), asyncio.ensure_future(pump(upstream, client))]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await upstream.close()
    await client.close()
    return client
