"""A decision-cache hit on ``/oauth2/auth`` answered from the parsed request head, with no request object.

Both listeners come here. The lean ``--auth-address`` listener calls ``answer`` from its parser callback;
the main listener gets ``HitFirstSite``: each connection's aiohttp request parser is wrapped so that, while
aiohttp has nothing in progress on that connection, a parsed ``<prefix>/auth`` request whose key has a live
entry is answered there and then, before aiohttp makes a request, a task, a router match, a response object
and a payload writer for it (on a hit those cost more than the whole answer). Everything else goes on to
aiohttp untouched, in order, and a key computed here for a miss is left on the parser for the decision
(``handed_key``), so a miss costs one key and one lookup, as on the lean listener.

A hit is the same answer either way: the 202's headers, X-Request-Id, Content-Length, Date (what aiohttp
writes for ``web.Response(status=202, headers=...)`` once ``drop_server_header`` has run), the same counts
and the same access line (``middleware.finish_cached``). Only plain keep-alive HTTP/1.1 requests without a
body or ``Expect`` take this path on the main listener; HTTP/1.0, ``Connection: close``, upgrades, bodies
and ``Expect: 100-continue`` (aiohttp answers an interim 100 first) go through aiohttp as before. The
wrapped parts of aiohttp (``RequestHandler._parser``, ``_waiter``, ``_messages`` and its keep-alive clock)
are checked when the site starts; on an aiohttp without them the site is a plain ``SockSite`` and every
request takes the ordinary path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.streams import EMPTY_PAYLOAD

from . import metrics
from .context import SERVICES, Services, trusted_peer
from .decisions import STATUS_202, Decision, Key, header_lists, request_key
from .framing import connection, http_date
from .middleware import finish_cached

log = logging.getLogger("sidecar.hits")

ROUTE = "/oauth2/auth"  # the metrics and log label, as for the decision itself


def answer(
    svc: Services,
    hit: Decision,
    method: str,
    path: str,
    incoming: str | None,
    remote: str | None,
    trusted: bool,
    version: tuple[int, int],
    keep: bool,
    started: float,
) -> bytes:
    """A cached 202 as the decision would have framed it: its headers, then X-Request-Id, length, Date,
    Connection; counted and logged as any other answer. ``incoming``: the request's first X-Request-Id."""
    metrics.DECISIONS.add("202")
    client_ip = (hit.forwarded_ip or str(remote)) if trusted else str(remote)
    request_id = finish_cached(svc, ROUTE, method, path, time.monotonic() - started, incoming, hit.session, client_ip)
    tail = f"X-Request-Id: {request_id}\r\n" if request_id else ""
    if method != "HEAD":
        tail += "Content-Length: 0\r\n"
    tail += f"Date: {http_date()}\r\n{connection(version, keep)}\r\n"
    return STATUS_202[version] + hit.header_block() + tail.encode()


class HitFirst:
    """One main-listener connection's aiohttp request parser, with cache hits answered as they are parsed."""

    __slots__ = (
        "_parser",
        "_handler",
        "_svc",
        "_path",
        "_query_path",
        "_remote",
        "_trusted",
        "pending",
        "message_consumed",
    )

    def __init__(self, parser: Any, handler: Any, svc: Services) -> None:
        self._parser = parser
        self._handler = handler
        self._svc = svc
        self._path = svc.config.proxy_prefix + "/auth"
        self._query_path = self._path + "?"
        self._remote: str | None = None
        self._trusted: bool | None = None  # the peer's trust, looked at on the first cacheable request
        self.pending: tuple[Any, Key] | None = None  # a message that missed, and its key, for the decision
        self.message_consumed = parser.message_consumed  # aiohttp calls it per request: the parser's own, no frame

    def feed_data(self, data: bytes) -> Any:
        messages, upgraded, tail = self._parser.feed_data(data)
        if messages and not messages[0][0].path.startswith(self._path):
            return messages, upgraded, tail  # not <prefix>/auth (a proxied request, a page): aiohttp's, as _hit says
        while messages and not upgraded:
            handler = self._handler
            waiter = handler._waiter
            # Only while aiohttp waits for the next request: then nothing of this connection is ahead of these.
            if waiter is None or waiter.done() or handler._messages or handler.writing_paused:
                break
            index = 0
            for message, payload in messages:
                answered = self._hit(message, payload)
                if answered is None:
                    break
                handler.transport.write(answered)
                self._parser.message_consumed()
                self._served()
                index += 1
            if not index:
                break
            # The parser stops at aiohttp's queue limit (counting the hits) and keeps the rest of a pipelined
            # batch; aiohttp reads on only when its own queue drains, which hits never fill: read on here.
            more, upgraded, tail = self._parser.feed_data(b"")
            if index < len(messages):
                return [*messages[index:], *more], upgraded, tail
            messages = more
        return messages, upgraded, tail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)

    def _hit(self, message: Any, payload: Any) -> bytes | None:
        """The answer's bytes if ``message`` is a hit; None for aiohttp (with the key left in ``pending``)."""
        svc = self._svc
        decisions = svc.decisions
        if decisions is None or payload is not EMPTY_PAYLOAD:  # a body, or an _ErrInfo: aiohttp's
            return None
        target = message.path
        if target != self._path and not target.startswith(self._query_path):
            return None
        if message.should_close or message.version != HttpVersion11 or message.upgrade:
            return None
        started = time.monotonic()
        trusted = self._trusted
        if trusted is None:
            peer = self._handler.transport.get_extra_info("peername")
            self._remote = str(peer[0]) if isinstance(peer, (list, tuple)) else None if peer is None else str(peer)
            trusted = self._trusted = trusted_peer(self._remote, svc.config)
        headers = message.headers
        if "Expect" in headers:  # aiohttp's router answers "100 Continue" first (web_urldispatcher): its path
            return None
        names, values = header_lists(headers)
        query = target.partition("?")[2]  # as sent, a "#..." included: yarl's query drops it, fronts reads it
        key = request_key(message.method, names, values, query, trusted, svc.config)
        hit = decisions.get(key) if key is not None else None
        if hit is None:
            self.pending = (message, key or ())
            return None
        incoming = headers.get("X-Request-Id")
        method = message.method
        return answer(svc, hit, method, self._path, incoming, self._remote, trusted, (1, 1), True, started)

    def _served(self) -> None:
        """What aiohttp does after each request it answered: count it, move the keep-alive deadline."""
        handler = self._handler
        manager = handler._manager
        if manager is not None:
            manager.requests_count += 1
        handler._keepalive = True  # as aiohttp after a keep-alive answer (it starts False before 3.14.5)
        timeout = handler._keepalive_timeout
        if timeout:
            loop = handler._loop
            handler._next_keepalive_close_time = close_time = loop.time() + timeout
            if handler._keepalive_handle is None:
                handler._keepalive_handle = loop.call_at(close_time, handler._process_keepalive)


_HANDLER_PARTS = (
    "_parser",
    "_waiter",
    "_messages",
    "_manager",
    "_loop",
    "_keepalive",
    "_keepalive_timeout",
    "_next_keepalive_close_time",
    "_keepalive_handle",
    "_process_keepalive",
    "writing_paused",
)


def _supported(handler: Any) -> bool:
    """Whether this aiohttp's request handler has the parts ``HitFirst`` relies on."""
    return all(hasattr(handler, name) for name in _HANDLER_PARTS) and hasattr(handler._parser, "message_consumed")


class HitFirstSite(web.SockSite):
    """``web.SockSite`` for the main listener, with ``HitFirst`` on every connection's parser (see the module
    docstring). Without a decision cache it is a plain ``SockSite``."""

    async def start(self) -> None:
        runner = self._runner
        server = runner.server
        if server is None:
            raise RuntimeError("call runner.setup() before starting a site")
        app = getattr(runner, "app", None)
        svc: Services | None = app.get(SERVICES) if isinstance(app, web.Application) else None
        if svc is None or svc.decisions is None:
            return await super().start()
        if not _supported(server()):
            # Still right, only slower: every hit goes through aiohttp's request, as before this module existed
            log.warning(
                "aiohttp lacks the parts hits.py wraps: main-listener cache hits take aiohttp's ordinary path",
                extra={"fields": {"aiohttp": aiohttp.__version__}},
            )
            return await super().start()
        await web.BaseSite.start(self)

        def protocol() -> Any:
            handler: Any = server()
            handler._parser = HitFirst(handler._parser, handler, svc)
            return handler

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(protocol, sock=self._sock, backlog=self._backlog)


def handed_key(request: web.Request) -> Key | None:
    """The key ``HitFirst`` computed for ``request`` when it found no entry (``()``: not cacheable); None when
    it did not look at this request (aiohttp had another in progress, or the site is a plain ``SockSite``)."""
    parser: Any = getattr(request.protocol, "_parser", None)
    if parser.__class__ is HitFirst:
        pending = parser.pending
        if pending is not None and pending[0] is getattr(request, "_message", None):
            parser.pending = None
            key: Key = pending[1]
            return key
    return None
