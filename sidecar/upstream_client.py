"""The pooled HTTP client the reverse proxy sends upstream with: pool, timeouts, automatic headers.

Kept apart from ``proxy.py`` (how the answer streams back) and ``forward.py`` (what is forwarded): this is
only how the connection pool and aiohttp's request object are configured, and how the headers ``forward.py``
builds are handed to aiohttp without its per-header copying loops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from multidict import CIMultiDict, istr
from yarl import URL

from .config import Config
from .forward import Forwarded

log = logging.getLogger("sidecar.upstream_client")

# What aiohttp must never add to a proxied request: the app sees the client's headers, not aiohttp's.
_SKIP_AUTO = ("User-Agent", "Accept-Encoding", "Content-Type")


class _UpstreamRequest(aiohttp.ClientRequest):
    """aiohttp's request with its automatic headers decided once, not per request.

    With ``skip_auto_headers`` aiohttp sorts the names into a new multidict and copies the request's headers
    on every request (about 3 % of the proxy's instructions per request); the outcome never varies: only
    ``Accept: */*`` is added when absent. ``upstream_client`` uses this class only when it gives exactly what
    the stock class gives on this aiohttp version (``same_auto_headers``)."""

    def update_headers(self, headers: Any) -> None:
        """``forward.Forwarded`` (``Host`` first, every name once) as one C-level copy: what aiohttp's loop makes
        of it, which puts ``Host`` first and keeps every other header in order. Anything else: aiohttp's own."""
        if type(headers) is Forwarded:
            self.headers = CIMultiDict(headers)
        else:
            super().update_headers(headers)

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        if "Accept" not in self.headers:
            self.headers["Accept"] = "*/*"
        self._skip_auto_headers = _SKIPPED


_SKIPPED: CIMultiDict[None] = CIMultiDict((name, None) for name in sorted(_SKIP_AUTO))


def _samples() -> list[CIMultiDict[str]]:
    """Header sets the start-up checks compare aiohttp's outcome and the fast one's on: plain multidicts (aiohttp's
    own path in both) and ``Forwarded`` ones as ``forward.py`` builds them, with and without each automatic header."""
    cases: list[dict[str, str]] = [{}, {"Accept": "a/b"}, {"User-Agent": "u", "Accept-Encoding": "br"}]
    cases.append({"Content-Type": "t/x", "Accept": "*/*", "Host": "h"})
    made: list[CIMultiDict[str]] = [CIMultiDict(headers) for headers in cases]
    for headers in cases:
        forwarded = Forwarded(Host="app.example:8443")
        forwarded.update((name, value) for name, value in headers.items() if name != "Host")
        forwarded.update({"Cookie": "a=1; b=2", "X-Forwarded-User": "u", "x-forwarded-for": "1.2.3.4, ::1"})
        made.append(forwarded)
    return made


def same_auto_headers(loop: asyncio.AbstractEventLoop, kind: type[aiohttp.ClientRequest] = _UpstreamRequest) -> bool:
    """Whether ``kind`` sends, adds and skips exactly what the stock request does here (headers in order and
    the skip list that aiohttp reads again when it sends a body), over requests with and without each header."""
    skip = frozenset(istr(name) for name in _SKIP_AUTO)
    url = URL("http://upstream.invalid/")
    try:
        for headers in _samples():
            for data in (None, b"x"):
                made = [
                    each("POST", url, headers=headers.copy(), skip_auto_headers=skip, data=data, loop=loop)
                    for each in (aiohttp.ClientRequest, kind)
                ]
                stock, ours = ([*req.headers.items()] for req in made)
                if stock != ours or [*made[0].skip_auto_headers] != [*made[1].skip_auto_headers]:
                    return False
    except Exception:  # noqa: BLE001 - another aiohttp: its own class, however it fails here
        return False
    return True


def _copy_forwarded(stock: Callable[[Any], CIMultiDict[str]]) -> Callable[[Any], CIMultiDict[str]]:
    """The session's header merge with ``Forwarded`` copied in one C call: with no default headers on the session
    aiohttp's loop gives exactly a copy of a mapping whose names are unique. Kept a ``Forwarded``, so the request
    class knows it still is one. Any other mapping goes through aiohttp's own merge."""

    def prepare(headers: Any) -> CIMultiDict[str]:
        if type(headers) is Forwarded:
            return Forwarded(headers)
        return stock(headers)

    return prepare


def same_merge(session: aiohttp.ClientSession, prepare: Callable[[Any], CIMultiDict[str]]) -> bool:
    """Whether ``prepare`` merges exactly as this session's own ``_prepare_headers`` on every sample (names,
    values, order), and the session has no default headers that the copy would leave out."""
    stock = getattr(session, "_prepare_headers", None)
    if stock is None or getattr(session, "_default_headers", None):
        return False
    try:
        return all([*prepare(h).items()] == [*stock(h).items()] for h in _samples())
    except Exception:  # noqa: BLE001 - another aiohttp: its own merge, however it fails here
        return False


def upstream_client(config: Config) -> aiohttp.ClientSession:
    """The pooled client for proxied requests (call with the loop running): no connection limit, bodies passed
    through as sent (no decompression), no cookie jar (the app's cookies are the browser's business), no header
    the client did not send but ``Accept`` (aiohttp's default, as before), ``--upstream-timeout`` to connect
    and between reads."""
    loop = asyncio.get_running_loop()
    seconds = config.upstream_timeout
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(sock_connect=seconds, sock_read=seconds),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        skip_auto_headers=_SKIP_AUTO,
        request_class=_UpstreamRequest if same_auto_headers(loop) else _stock_request(),
    )
    hand_over(session)
    return session


def _stock_request() -> type[aiohttp.ClientRequest]:
    """aiohttp's own request class, said once: still right, only slower (an operator sees why)."""
    log.warning(
        "aiohttp's request class adds headers otherwise than upstream_client expects: proxied requests use it as is",
        extra={"fields": {"aiohttp": aiohttp.__version__}},
    )
    return aiohttp.ClientRequest


def hand_over(session: aiohttp.ClientSession) -> bool:
    """Install the one-copy header merge on ``session`` when it gives aiohttp's own result here; otherwise keep
    aiohttp's merge (still right, only slower) and say so once, as ``hits.py`` does for the parts it wraps."""
    stock = getattr(session, "_prepare_headers", None)
    prepare = _copy_forwarded(stock) if stock is not None else None
    if prepare is not None and same_merge(session, prepare):
        # object.__setattr__: aiohttp's debug mode warns on any attribute set on a session
        object.__setattr__(session, "_prepare_headers", prepare)
        return True
    log.warning(
        "aiohttp's header merge differs from the one-copy hand-over: proxied requests take aiohttp's own path",
        extra={"fields": {"aiohttp": aiohttp.__version__}},
    )
    return False
