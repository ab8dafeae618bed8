"""The person at the browser, as a ``BROWSER`` command: ``python -m tests.e2e.person URL``.

Python's ``webbrowser`` (what the README's MCP client calls) runs ``$BROWSER`` with the URL; this plays the
person in real Chromium: signs in at the dev provider as alice when asked, confirms a device code, presses
Allow on the consent page, goes through the grant's own sign-in, and stops at the first page that asks
nothing (the client's loopback page, "Device connected"). Exit status 0 when it got there.
"""

from __future__ import annotations

import asyncio
import sys

from playwright.async_api import Page

from tests.e2e.chromium import one_page, step

QUESTIONS = ("button[name='user']", "button[name='decision']", "input[name='user_code']")
MAX_STEPS = 12


async def _asks_something(page: Page) -> bool:
    for selector in QUESTIONS:
        if await page.locator(selector).count():
            return True
    return False


async def act(url: str, user: str = "alice") -> str:
    """Open ``url`` in Chromium and do what the pages ask; the text of the last page."""
    async with one_page() as page:
        await page.goto(url, wait_until="load")
        for _ in range(MAX_STEPS):
            if not await _asks_something(page):
                return await page.locator("body").inner_text()
            await step(page, "approve", user)
    raise SystemExit(f"person: still asked something after {MAX_STEPS} steps")


if __name__ == "__main__":
    print(asyncio.run(act(sys.argv[1]))[:200], file=sys.stderr)
