"""Hostile variants against the page kit's pages and the same-origin rule of every state-changing form: a
"Try again" link that must never leave the site whatever path the request came to, and the ``Origin`` and
``Sec-Fetch-Site`` spellings a hand-made request can send. The real browser flows are in ``tests/e2e``;
these are hand-made requests on top, as hostile as they can be."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import unquote, urlsplit

import pytest

from sidecar.store import MemoryStore
from tests.stack import free_port, stack


async def _raw(base: str, target: str, headers: list[tuple[str, str]] | None = None) -> tuple[int, str]:
    """``target`` byte for byte (a client library would normalise it); the status and the body."""
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "Accept: text/html", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode("utf-8", "replace")


def _off_site(href: str) -> bool:
    """Would a browser leave the site following ``href`` (as the page writes it, HTML-escaped)?"""
    href = href.replace("&amp;", "&").replace("&#x27;", "'").replace("&quot;", '"')
    for form in (href, unquote(href), unquote(unquote(href))):
        form = re.sub(r"[\t\n\r]", "", form).replace("\\", "/")
        if not form.startswith("/") or form.startswith("//"):
            return True
    return False


OFF_SITE_PATHS = [
    "//evil.example/x",
    "///evil.example/",
    "////evil.example",
    "//evil.example",
    "//evil.example/?a=b#c",
    "/\\evil.example/x",
    "/\\/evil.example",
    "/%5Cevil.example",
    "/%2F%2Fevil.example/x",
    "/%2f/evil.example",
    "/%252F%252Fevil.example",
    "//%65vil.example/",
    "//user@evil.example/",
    "//evil.example:443/",
    "//EVIL.example/",
]


@pytest.mark.parametrize("method_target", ["/app/page?x=1&y=%20z"])
async def test_try_again_on_an_error_page_never_leaves_the_site(method_target: str) -> None:
    """The upstream is down (502 with "Try again"): whatever path the person was sent to, every link on the
    page stays on this site; an ordinary path is kept so "Try again" still retries it."""
    dead = f"http://127.0.0.1:{free_port()}/"
    async with stack(MemoryStore(), skip_auth_route="^/", upstream=dead) as st:
        status, page = await _raw(st.base, method_target)
        assert status == 502 and "Try again" in page
        assert f"href='{method_target.replace('&', '&amp;')}'" in page
        for target in OFF_SITE_PATHS:
            status, page = await _raw(st.base, target)
            hrefs = re.findall(r"href='([^']*)'", page)
            assert status in (400, 404, 502) and hrefs, (target, status)
            bad = [h for h in hrefs if _off_site(h)]
            assert not bad, f"{target!r}: the page links off the site: {bad}"
