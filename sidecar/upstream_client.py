"""The pooled HTTP client the reverse proxy sends upstream with: pool, timeouts, automatic headers.

Kept apart from ``proxy.py`` (what is forwarded, and how the answer streams back): this is only how the
connection pool and aiohttp's request object are configured.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiohttp
from multidict import CIMultiDict, istr
from yarl import URL

from .config import Config

# What aiohttp must never add to a proxied request: the app sees the client's headers, not aiohttp's.
_SKIP_AUTO = ("User-Agent", "Accept-Encoding", "Content-Type")


class _UpstreamRequest(aiohttp.ClientRequest):
    """aiohttp's request with its automatic headers decided once, not per request.

    With ``skip_auto_headers`` aiohttp sorts the names into a new multidict and copies the request's headers
    on every request (about 3 % of the proxy's instructions per request); the outcome never varies: only
    ``Accept: */*`` is added when absent. ``upstream_client`` uses this class only when it gives exactly what
    the stock class gives on this aiohttp version (``same_auto_headers``)."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        if "Accept" not in self.headers:
            self.headers["Accept"] = "*/*"
        self._skip_auto_headers = _SKIPPED


_SKIPPED: CIMultiDict[None] = CIMultiDict((name, None) for name in sorted(_SKIP_AUTO))


def same_auto_headers(loop: asyncio.AbstractEventLoop, kind: type[aiohttp.ClientRequest] = _UpstreamRequest) -> bool:
    """Whether ``kind`` adds and skips exactly what the stock request does here (headers and the
    skip list that aiohttp reads again when it sends a body), over requests with and without each header."""
    skip = frozenset(istr(name) for name in _SKIP_AUTO)
    url = URL("http://upstream.invalid/")
    cases: list[dict[str, str]] = [{}, {"Accept": "a/b"}, {"User-Agent": "u", "Accept-Encoding": "br"}]
    cases.append({"Content-Type": "t/x", "Accept": "*/*", "Host": "h"})
    try:
        for headers in cases:
            for data in (None, b"x"):
                made = [
                    each("POST", url, headers=CIMultiDict(headers), skip_auto_headers=skip, data=data, loop=loop)
                    for each in (aiohttp.ClientRequest, kind)
                ]
                stock, ours = ([*req.headers.items()] for req in made)
                if stock != ours or [*made[0].skip_auto_headers] != [*made[1].skip_auto_headers]:
                    return False
    except Exception:  # noqa: BLE001 - another aiohttp: its own class, however it fails here
        return False
    return True


def upstream_client(config: Config) -> aiohttp.ClientSession:
    """The pooled client for proxied requests (call with the loop running): no connection limit, bodies passed
    through as sent (no decompression), no cookie jar (the app's cookies are the browser's business), no header
    the client did not send but ``Accept`` (aiohttp's default, as before), ``--upstream-timeout`` to connect
    and between reads."""
    loop = asyncio.get_running_loop()
    seconds = config.upstream_timeout
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(sock_connect=seconds, sock_read=seconds),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        skip_auto_headers=_SKIP_AUTO,
        request_class=_UpstreamRequest if same_auto_headers(loop) else aiohttp.ClientRequest,
    )
