"""The person at the browser, as a ``BROWSER`` command: ``python -m tests.e2e.person URL``.

Python's ``webbrowser`` (what the README's MCP client calls) runs ``$BROWSER`` with the URL; this plays the
person: signs in at the dev provider as alice when asked, presses Allow on the consent page (and confirms a
device code), goes through the grant's own sign-in, and stops at the first page that asks nothing (the
client's loopback page, "Device connected"). Exit status 0 when it got there.
"""

from __future__ import annotations

import asyncio
import sys
from urllib.parse import parse_qsl, urljoin, urlsplit

import aiohttp

from tests.e2e.oauth_browser import MAX_HOPS, submit


async def act(url: str, user: str = "alice") -> str:
    """Open ``url`` and do what the pages ask; the text of the last page."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        resp = await browser.get(url, allow_redirects=False)
        for _ in range(MAX_HOPS * 2):
            page = await resp.text()
            here = str(resp.url)
            if resp.status in (302, 303, 307):
                resp = await browser.get(urljoin(here, resp.headers["Location"]), allow_redirects=False)
                continue
            if resp.status != 200:
                raise SystemExit(f"person: {resp.status} at {here}: {page[:300]}")
            if "name='user_code'" in page:
                code = dict(parse_qsl(urlsplit(url).query)).get("user_code", "")
                resp = await submit(browser, here, page, {"user_code": code})
            elif "name='decision'" in page:
                resp = await submit(browser, here, page, {"decision": "approve"})
            elif "name='user'" in page:
                resp = await submit(browser, here, page, {"user": user})
            else:
                return page
    raise SystemExit("person: too many pages")


if __name__ == "__main__":
    print(asyncio.run(act(sys.argv[1]))[:200], file=sys.stderr)
