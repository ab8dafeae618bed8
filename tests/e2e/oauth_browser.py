"""The person in front of the browser, for the OAuth client tests: read the sidecar's consent and device pages
as HTML, submit their forms like a browser (same-origin ``Origin`` header, the page's CSRF field), follow the
redirects through the dev provider's sign-in, and stop at the client's redirect URI (which nobody listens on:
a CLI would read the code from its loopback listener; the test reads it from the ``Location``)."""

from __future__ import annotations

import html
import re
from urllib.parse import parse_qsl, urljoin, urlsplit

import aiohttp

_FORM = re.compile(r"<form\b[^>]*\baction='([^']*)'[^>]*>(.*?)</form>", re.S)
_HIDDEN = re.compile(r"<input type='hidden' name='([^']+)' value='([^']*)'>")
MAX_HOPS = 12


def forms(page: str) -> list[tuple[str, dict[str, str]]]:
    """(action, hidden fields) of every form on a page, HTML entities decoded as a browser would."""
    found = []
    for action, inner in _FORM.findall(page):
        fields = {html.unescape(k): html.unescape(v) for k, v in _HIDDEN.findall(inner)}
        found.append((html.unescape(action), fields))
    return found


async def submit(
    browser: aiohttp.ClientSession, page_url: str, page: str, extra: dict[str, str], index: int = 0
) -> aiohttp.ClientResponse:
    """Post form ``index`` of ``page`` (loaded from ``page_url``) with ``extra`` fields; redirects not followed."""
    action, fields = forms(page)[index]
    target = urljoin(page_url, action)
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(target))
    return await browser.post(target, data={**fields, **extra}, headers={"Origin": origin}, allow_redirects=False)


async def follow_to(browser: aiohttp.ClientSession, resp: aiohttp.ClientResponse, prefix: str) -> dict[str, str]:
    """Follow redirects (sidecar -> provider -> callback -> ...) until one points at ``prefix``; its query."""
    for _ in range(MAX_HOPS):
        body = await resp.text()
        if resp.status not in (302, 303, 307):
            raise AssertionError(f"expected a redirect towards {prefix}, got {resp.status}: {body[:500]}")
        location = urljoin(str(resp.url), resp.headers["Location"])
        resp.release()
        if location.startswith(prefix):
            return dict(parse_qsl(urlsplit(location).query))
        resp = await browser.get(location, allow_redirects=False)
    raise AssertionError(f"no redirect to {prefix} within {MAX_HOPS} hops")


async def approve_authorization(
    browser: aiohttp.ClientSession, authorize_url: str, redirect_uri: str
) -> dict[str, str]:
    """Open the authorization URL in a signed-in browser, check the consent page names the redirect URI,
    click Allow, and return the parameters of the final redirect to the client (code, state, iss)."""
    async with browser.get(authorize_url, allow_redirects=False) as resp:
        page = await resp.text()
        assert resp.status == 200, f"consent page expected, got {resp.status}: {page[:300]}"
        assert "frame-ancestors 'none'" in resp.headers.get("Content-Security-Policy", "") or resp.headers.get(
            "X-Frame-Options", ""
        ).upper() in ("DENY", "SAMEORIGIN"), "the consent page must not be frameable"
    assert html.escape(redirect_uri, quote=True) in page or redirect_uri in page, "consent names the redirect URI"
    resp = await submit(browser, authorize_url, page, {"decision": "approve"})
    return await follow_to(browser, resp, redirect_uri)
