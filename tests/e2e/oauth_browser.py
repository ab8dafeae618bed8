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


async def approve_device(browser: aiohttp.ClientSession, verification_uri_complete: str, user: str = "alice") -> str:
    """What the person does with ``verification_uri_complete``: open it (signing in at the provider if asked,
    as ``user``), confirm the pre-filled code, Allow on the consent page, go through the grant's sign-in.
    Returns the final page's text (the sidecar's "Device connected" page)."""
    url = verification_uri_complete
    resp = await browser.get(url, allow_redirects=False)
    for _ in range(MAX_HOPS * 2):
        page = await resp.text()
        url = str(resp.url)
        if resp.status in (302, 303, 307):
            resp = await browser.get(urljoin(url, resp.headers["Location"]), allow_redirects=False)
            continue
        assert resp.status == 200, f"{resp.status} at {url}: {page[:300]}"
        if "Device connected" in page:
            return page
        if "name='user_code'" in page:  # the code entry form, pre-filled: confirm it
            code = parse_qsl(urlsplit(verification_uri_complete).query)
            resp = await submit(browser, url, page, {"user_code": dict(code)["user_code"]})
        elif "name='decision'" in page:  # the consent page
            resp = await submit(browser, url, page, {"decision": "approve"})
        elif "name='user'" in page:  # the dev provider's login page (make run has no auto-login)
            resp = await submit(browser, url, page, {"user": user})
        else:
            raise AssertionError(f"unexpected page at {url}: {page[:500]}")
    raise AssertionError("the device approval did not finish")
