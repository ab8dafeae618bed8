"""``--auth-address``: a lean listener that serves only ``<prefix>/auth``, for nginx ``auth_request`` and
ingress-nginx ``auth-url``.

aiohttp's own request machinery (its parser wrapper, request and response objects, the handler task,
the payload writer) costs more than the whole auth decision on a session cache hit, so the auth
endpoint, which a front calls once per page request, gets its own ``asyncio.Protocol`` on llhttp
(``httptools``). The decision itself is not copied: each request becomes an ``AuthRequest`` (the
few attributes of ``web.Request`` the decision reads) and goes through the very same
``guarded(auth_decision.auth)`` the main listener routes to, so status, identity headers, challenges,
metrics and the access log line are the same code. Only the HTTP framing is new, and it is kept
narrow: no request bodies, no upgrades, no chunked input, one path; anything else is refused and
the connection closed, which is what a front's auth subrequest never needs.

A hot session's answer comes from the decision cache (``decisions.py``, shared with the main listener):
the raw headers give the key, and a hit is written straight from the parser's callback with its
access line and counts, with no request object, task or response object (``AuthProtocol._from_cache``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, cast

import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .auth_decision import auth
from .auth_request import AuthRequest
from .config import Config
from .context import DECISION_KEY, SERVICES, Services, trusted_peer
from .decisions import Key, key_names, request_key
from .framing import plain, serialize
from .hits import answer
from .middleware import guarded

log = logging.getLogger("sidecar.auth_listener")

MAX_LINE_BYTES = 8190  # the main listener's limits (app.MAX_HEADER_BYTES): request target, each header name/value
MAX_HEAD_BYTES = 65536  # a whole request head (line and headers) past this is refused with 431
MAX_HEADERS = 100  # header fields per request; nginx sends a dozen
HEADER_TIMEOUT = 10.0  # seconds in a head (from its first byte or the connection's start), plus one sweep tick
IDLE_TIMEOUT = 75.0  # keep-alive connection with nothing to do (aiohttp's default, above nginx's 60 s)
MAX_REQUESTS = 10000  # answers per connection; the last one says Connection: close
MAX_PIPELINED = 16  # requests read ahead of the answers; reading pauses beyond this
# Methods a front may use for its auth subrequest (nginx: GET, or the original method with
# ingress-nginx's auth-method). Every one is answered the same, as on the main listener; none may
# carry a body.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Headers a request may carry once (RFC 9110), refused with 400 when repeated, as aiohttp's parser does on the
# main listener: two Host headers name two requests. (Content-Length and Transfer-Encoding are refused anyway.)
SINGLETONS = frozenset(
    {
        b"host",
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"max-forwards",
        b"server",
        b"user-agent",
    }
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Head(NamedTuple):
    """A request's headers as llhttp gave them: names and values in order, and the first X-Request-Id."""

    names: list[str]
    values: list[str]
    request_id: str | None


class _Refused(Exception):
    """A request this listener will not read further: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class AuthListener:
    """What every connection shares: the app (for its services), the decision, the limits."""

    def __init__(
        self,
        app: web.Application,
        config: Config,
        *,
        header_timeout: float = HEADER_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_requests: int = MAX_REQUESTS,
    ) -> None:
        self.app = app
        self.path = config.proxy_prefix + "/auth"
        self.subpaths = config.front == "envoy"  # ext_authz appends the original path to the auth URL's
        self.decide: Handler = guarded(auth, "/oauth2/auth")
        self.config = config
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_requests = max_requests
        self.connections: set[AuthProtocol] = set()
        self.server: asyncio.AbstractServer | None = None
        self.closing = False
        # One sweep for every connection's header and idle timeouts: the requests themselves touch no clock
        # and no timer (a timer per connection cost a cancel and a new timer on every request).
        self.tick = min(1.0, header_timeout / 5, idle_timeout / 5)
        self.sweeper: asyncio.TimerHandle | None = None

    def protocol(self) -> AuthProtocol:
        return AuthProtocol(self)

    async def start(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self.protocol, sock=sock, backlog=1024)
        self.sweeper = loop.call_later(self.tick, self._sweep)

    def _sweep(self) -> None:
        """Close the connections that sat in one state too long: a head still incomplete after the header
        timeout (slowloris, or a silent new connection), a keep-alive connection idle past the idle timeout.
        A connection's state is (answers so far, inside a head); the clock starts when the sweep first sees
        it, so a timeout is its value plus at most one tick. Connections with answers pending are left be."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self.connections):
            if conn.closed or conn.busy or conn.queue:
                conn.mark = None
                continue
            state = (conn.served, conn.in_head)
            if state != conn.mark:
                conn.mark, conn.since = state, now
            elif now - conn.since >= (self.header_timeout if conn.in_head else self.idle_timeout):
                conn.close()  # no answer, just close
        self.sweeper = loop.call_later(self.tick, self._sweep)

    def stop_accepting(self) -> None:
        """At SIGTERM: no new connections; idle ones close now, busy ones after their answers."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close_when_idle()

    async def drain(self) -> None:
        """Returns when every connection has closed (the caller bounds it with --shutdown-timeout)."""
        self.stop_accepting()
        while self.connections:
            await asyncio.sleep(0.02)
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self.server is not None:
            await self.server.wait_closed()


class AuthProtocol(asyncio.Protocol):
    """One client connection: llhttp parses, requests queue in order, one task answers them in turn."""

    def __init__(self, listener: AuthListener) -> None:
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote: str | None = None
        self.trusted = False
        self.queue: deque[tuple[Any, ...]] = deque()
        self.busy = False
        self.closed = False
        self.stopped_reading = False  # after a refusal or the last allowed request: the rest is ignored
        self.paused = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.served = 0
        self.in_head = True
        self.head_bytes = 0
        self.mark: tuple[int, bool] | None = None  # the state the listener's sweep last saw, and since when
        self.since = 0.0
        self._url = b""
        self._names: list[str] = []  # the request's header names and values, as sent, in order
        self._values: list[str] = []
        self._request_id: str | None = None  # its first X-Request-Id
        self._lengths = 0
        self._te = False
        self._once: set[bytes] = set()

    # -- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) and peer else None
        self.trusted = trusted_peer(self.remote, self.listener.config)
        self.listener.connections.add(self)
        if self.listener.closing:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connections.discard(self)
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def close_when_idle(self) -> None:
        if not self.busy and not self.queue:
            self.close()

    # -- parsing ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.stopped_reading or self.closed:
            return
        if self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
            if self.in_head and self.head_bytes > MAX_HEAD_BYTES:
                raise _Refused(431, "431 Request Header Fields Too Large\n")
        except _Refused as exc:
            self._refuse(exc)
        except httptools.HttpParserUpgrade:
            self._no_upgrade()
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._refuse(cause if isinstance(cause, _Refused) else _Refused(400, "400 Bad Request\n"))

    def _no_upgrade(self) -> None:
        """``Upgrade`` is not served: a request that asked for one (a websocket page's headers copied into
        the auth subrequest) is answered as usual, then the connection closes; the bytes after it are
        never read as HTTP. A CONNECT (llhttp stops before its message completes) is refused."""
        self.stopped_reading = True
        if self.queue and self.queue[-1][0] == "request":
            self.queue[-1] = (*self.queue[-1][:5], False)
        else:
            self._refuse(_Refused(400, "400 Bad Request: upgrades are not served here\n"))

    def _refuse(self, exc: _Refused) -> None:
        """Answer after whatever is already queued, then close; never read this connection again."""
        self.stopped_reading = True
        self.queue.append(("refuse", exc.status, exc.text))
        self._kick()

    def on_message_begin(self) -> None:
        if not self.in_head:
            self.in_head = True
            self.head_bytes = 0
        self._url = b""
        self._names = []
        self._values = []
        self._request_id = None
        self._lengths = 0
        self._te = False
        self._once = set()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE_BYTES:
            raise _Refused(400, "400 Bad Request: request line too long\n")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) > MAX_LINE_BYTES or len(value) > MAX_LINE_BYTES:
            raise _Refused(400, "400 Bad Request: header field too long\n")
        if len(self._names) >= MAX_HEADERS:
            raise _Refused(431, "431 Request Header Fields Too Large\n")
        lowered = name.lower()
        if lowered == b"content-length":
            self._lengths += 1
            if self._lengths > 1 or value.strip() != b"0":
                raise _Refused(400, "400 Bad Request: no request body is read here\n")
        elif lowered == b"transfer-encoding":
            raise _Refused(400, "400 Bad Request: no request body is read here\n")
        elif lowered in SINGLETONS:
            if lowered in self._once:
                raise _Refused(400, f"400 Bad Request: more than one {name.decode('ascii', 'replace')} header\n")
            self._once.add(lowered)
        elif lowered == b"x-request-id" and self._request_id is None:
            self._request_id = value.strip(b" \t").decode("utf-8", "surrogateescape")  # what a hit answers with
        # A field value has no whitespace at either end (RFC 9110 5.5); llhttp leaves it at the end, aiohttp
        # strips it: "X-Forwarded-Uri: /admin/x " must name /admin/x on both listeners.
        value = value.strip(b" \t")
        self._names.append(name.decode("utf-8", "surrogateescape"))
        self._values.append(value.decode("utf-8", "surrogateescape"))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0

    def on_body(self, body: bytes) -> None:
        raise _Refused(400, "400 Bad Request: no request body is read here\n")

    def on_message_complete(self) -> None:
        version = self.parser.get_http_version()
        item = (
            self.parser.get_method().decode("ascii", "replace"),
            self._url,
            Head(self._names, self._values, self._request_id),
            (1, 0) if version == "1.0" else (1, 1),
            self.parser.should_keep_alive(),
        )
        self.served += 1
        if self.served >= self.listener.max_requests:
            self.stopped_reading = True  # this is the last answer on the connection; the rest is not read
            item = (*item[:4], False)
        looked_up: tuple[Key | None, ...] = ()
        if not self.busy and not self.queue and self.writable.is_set() and not self.parser.should_upgrade():
            # Nothing ahead of it: a cached answer goes out now, with no task, queue or request object.
            keep = item[4] and not self.listener.closing
            data, key = self._from_cache(item[0], item[1], item[2], item[3], keep)
            if data is not None:
                self._write(data)
                if not keep:
                    self.close()
                return
            looked_up = (key,)  # a miss: the decision gets the key, not a second lookup
        self.queue.append(("request", *item, *looked_up))
        if len(self.queue) >= MAX_PIPELINED and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._kick()

    # -- answering ----------------------------------------------------------------------------

    def _kick(self) -> None:
        if not self.busy:
            self.busy = True
            self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self.queue and not self.closed:
                item = self.queue.popleft()
                if item[0] == "refuse":
                    self._write(plain(item[1], item[2], (1, 1), False))
                    self.close()
                    return
                data, keep = await self._answer(*item[1:])
                if self.closed:
                    return
                self._write(data)
                if not keep:
                    self.close()
                    return
                if not self.writable.is_set():
                    await self.writable.wait()
        except Exception:  # a bug here must cost one connection, never the worker
            log.exception("auth listener: connection failed")
            self.close()
            return
        finally:
            self.busy = False
        if self.closed:
            return
        if self.listener.closing:
            self.close()
            return
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def _answer(
        self,
        method: str,
        url: bytes,
        head: Head,
        version: tuple[int, int],
        keep: bool,
        *looked_up: Key | None,
    ) -> tuple[bytes, bool]:
        """The bytes for one request and whether the connection stays open after them. ``looked_up``: the
        decision cache key, when the cache was already asked (and had nothing) as the request arrived."""
        keep = keep and not self.listener.closing
        if looked_up:
            key = looked_up[0]
        else:
            data, key = self._from_cache(method, url, head, version, keep)
            if data is not None:
                return data, keep
        target = url.decode("ascii", "surrogateescape")
        path, _, query = target.partition("?")
        svc: Services = self.listener.app[SERVICES]
        headers = CIMultiDictProxy(CIMultiDict(zip(head.names, head.values, strict=True)))
        if version == (1, 1) and "Host" not in headers:
            return plain(400, "400 Bad Request: missing Host header\n", version, False), False
        if path != self.listener.path and not (self.listener.subpaths and path.startswith(self.listener.path + "/")):
            return plain(404, "404 Not Found\n", version, keep), keep
        if method not in METHODS:
            return plain(405, "405 Method Not Allowed\n", version, keep), keep
        request = AuthRequest(self.listener.app, method, path, query, headers, self.remote, version)
        if svc.decisions is not None:
            request[DECISION_KEY] = key or ()  # looked up above: the decision does not look again
        try:
            response = await self.listener.decide(request)  # type: ignore[arg-type]
        except web.HTTPException as exc:  # raised by a hook (401 invalid_token...): it is the answer
            response = exc
        try:
            return serialize(response, version, keep, method == "HEAD"), keep
        except (TypeError, ValueError):
            log.exception("auth listener: answer could not be framed")
            return plain(500, "500 Internal Server Error\n", version, False), False

    def _from_cache(
        self, method: str, url: bytes, head: Head, version: tuple[int, int], keep: bool
    ) -> tuple[bytes | None, Key | None]:
        """The cached answer's bytes, or None and the key (None: not cacheable) for the decision to use."""
        svc: Services = self.listener.app[SERVICES]
        if svc.decisions is None or method not in METHODS:
            return None, None
        started = time.monotonic()
        path, _, query = url.decode("ascii", "surrogateescape").partition("?")
        if path != self.listener.path:
            return None, None
        key = request_key(method, head.names, head.values, query, self.trusted, self.listener.config)
        if key is None:
            return None, None
        hit = svc.decisions.get(key)
        if hit is None or (version == (1, 1) and "host" not in key_names(key)):  # no Host: the decision's 400
            return None, key
        return answer(svc, hit, method, path, head.request_id, self.remote, self.trusted, version, keep, started), key
