"""Stream a signed-in request to its upstream, and the answer back.

Bodies are streamed both ways (never buffered whole), hop-by-hop headers are
dropped, identity headers are the sidecar's alone, and the sidecar's own
cookies never reach the app (the session cookie holds the record's key).
"""

from __future__ import annotations

import asyncio
import functools
import posixpath
import time
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
from aiohttp import WSMsgType, web

from . import metrics
from .context import Services, view_of
from .errors import SessionGone
from .guard import authorize, sign_in_redirect
from .headers import HOP_BY_HOP, is_protected, upstream_identity_headers_for

_PATH_SAFE = "/:@!$&'()*+,;=-._~"


def _plain(raw_path: str) -> bool:
    """Nothing to decode or collapse: the common case, forwarded exactly as it came."""
    return "%" not in raw_path and "/." not in raw_path and "//" not in raw_path and "\\" not in raw_path


def normalise_path(raw_path: str) -> str:
    """The one path that is both matched against skip-auth rules and forwarded upstream."""
    if _plain(raw_path):
        return raw_path or "/"
    path = unquote(raw_path)
    if "\x00" in path or "\\" in path:
        raise web.HTTPBadRequest(text="400 Bad Request: malformed path\n")
    normal = posixpath.normpath("/" + path.lstrip("/"))
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if path.endswith("/") and normal != "/":
        normal += "/"
    return normal


_NOT_FORWARDED = HOP_BY_HOP | {"content-length", "x-forwarded-for"}


def _forward_headers(request: web.Request, config: Any) -> dict[str, str]:
    connection = request.headers.get("Connection")
    dropped = _NOT_FORWARDED | {h.strip().lower() for h in connection.split(",")} if connection else _NOT_FORWARDED
    out: dict[str, str] = {}
    for name, value in request.headers.items():
        low = name.lower()
        if low in dropped or is_protected(low):
            continue
        if low == "cookie" and config.cookie_name in value:
            value = _without_own_cookies(value, config.cookie_name)
            if not value:
                continue
        if name in out:
            out[name] += ", " + value
        else:
            out[name] = value
    if request.content_length is not None:
        out["Content-Length"] = str(request.content_length)
    return out


def _without_own_cookies(header: str, cookie_name: str) -> str:
    kept = []
    for part in header.split(";"):
        name = part.split("=", 1)[0].strip()
        if name == cookie_name or name.startswith(cookie_name + "_csrf_"):
            continue
        kept.append(part.strip())
    return "; ".join(p for p in kept if p)


def _forwarded_for(request: web.Request, config: Any) -> str:
    view = view_of(request)
    prior = request.headers.get("X-Forwarded-For") if view.trusted else None
    return f"{prior}, {request.remote}" if prior else str(request.remote)


async def handle(request: web.Request, svc: Services) -> web.StreamResponse:
    """Catch-all: authenticate (unless a skip-auth rule matches), then proxy."""
    config = svc.config
    path = normalise_path(request.rel_url.raw_path)
    upstream = next((u for u in config.upstreams if path.startswith(u.prefix) or path + "/" == u.prefix), None)
    skip = any(rule.matches(request.method, path) for rule in config.skip_routes)
    headers = {}
    if not skip:
        try:
            _, session = await authorize(request, svc)
        except SessionGone:
            return sign_in_redirect(request)
        headers = upstream_identity_headers_for(session, config)
    if upstream is None:
        return web.Response(status=404, text="404 Not Found: no upstream for this path\n")
    forward = _forward_headers(request, config)
    forward.update(headers)
    view = view_of(request)
    forward["X-Forwarded-For"] = _forwarded_for(request, config)
    forward["X-Forwarded-Proto"] = view.scheme
    forward["X-Forwarded-Host"] = view.host
    forward.setdefault("Host", request.host)
    raw = request.rel_url
    if path == raw.raw_path:
        url = upstream.url + raw.raw_path_qs
    else:
        url = (
            upstream.url + quote(path, safe=_PATH_SAFE) + (("?" + raw.raw_query_string) if raw.raw_query_string else "")
        )
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _websocket(request, svc, url, forward)
    return await _stream(request, svc, url, forward)


@functools.lru_cache(maxsize=8)
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(sock_connect=seconds, sock_read=seconds)


async def _stream(request: web.Request, svc: Services, url: str, headers: dict[str, str]) -> web.StreamResponse:
    assert svc.upstream_http is not None
    body = request.content if request.body_exists else None
    started = time.monotonic()
    try:
        upstream = await svc.upstream_http.request(
            request.method,
            url,
            headers=headers,
            data=body,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(
                sock_connect=svc.config.upstream_timeout, sock_read=svc.config.upstream_timeout
            ),
        )
    except TimeoutError:
        return web.Response(status=504, text="504 Gateway Timeout: the upstream did not answer in time\n")
    except aiohttp.ClientError:
        return web.Response(status=502, text="502 Bad Gateway: the upstream is unreachable\n")
    metrics.UPSTREAM_SECONDS.observe(time.monotonic() - started)
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        connection_listed = {h.strip().lower() for h in upstream.headers.get("Connection", "").split(",")}
        for name, value in upstream.headers.items():
            low = name.lower()
            if low in HOP_BY_HOP or low in connection_listed:
                continue
            response.headers.add(name, value)
        if (
            upstream.headers.get("Content-Length") is None
            and request.method != "HEAD"
            and upstream.status not in (204, 304)
        ):
            response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
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


async def _websocket(request: web.Request, svc: Services, url: str, headers: dict[str, str]) -> web.StreamResponse:
    assert svc.upstream_http is not None
    for name in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Host"):
        headers.pop(name, None)
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    headers.pop("Sec-WebSocket-Protocol", None)
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
