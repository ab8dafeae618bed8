"""Real Chromium for the browser steps: Debian's ``/usr/bin/chromium`` driven by Python Playwright.

No browser is downloaded (never ``playwright install``): Playwright only drives the distro's binary through
``executable_path``. Chromium itself sets ``Origin``, ``Referer``, ``Sec-Fetch-*`` and cookies, so a test
that goes through these helpers proves what a person's browser does; none of those headers is set by hand.

Use:

- ``async with chromium() as browser:`` then ``async with new_page(browser) as page:`` (one isolated
  cookie jar per ``new_page``), from any test or fixture running on the current event loop; or
- ``async with one_page() as page:`` a Chromium of its own, from a test on any loop; or
- the ``chromium_browser`` fixture (tests/e2e/conftest.py): one Chromium for the whole run, on the session
  event loop. A module using it runs its tests on that loop: ``pytestmark =
  pytest.mark.asyncio(loop_scope="session")`` and builds its stacks in fixtures with the same loop scope.

Then the person's steps: ``walk(page, url, done=...)`` signs in at the dev provider when asked, confirms the
device code, answers the consent page, until ``done`` holds (``carry_on(page, done)``: the same from the page
the browser shows, without opening it again); ``approve_authorization`` and ``approve_device``
are the two common walks. ``watch(page, prefix)`` records the browser's navigations to a client's redirect
URI (a real client's loopback listener, or nobody: the request is what counts). ``fetch(page, url, ...)`` is
the page's own script calling ``fetch()`` (an API call of a signed-in page), ``submit_form(page, action, ...)``
a form the page posts: Chromium still sets every header a browser sets.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web
from playwright.async_api import Browser, BrowserContext, Page, Request, Response, async_playwright
from playwright.async_api import Error as PlaywrightError

from tests.stack import free_port

CHROMIUM = os.environ.get("SIDECAR_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
STEP_TIMEOUT_MS = 15_000
MAX_STEPS = 12


class ChromiumMissing(RuntimeError):
    pass


def chromium_path() -> str:
    """The Chromium binary, or a loud failure saying what to install (never a skip)."""
    path = CHROMIUM if os.path.isabs(CHROMIUM) else (shutil.which(CHROMIUM) or "")
    if not path or not os.access(path, os.X_OK):
        raise ChromiumMissing(
            f"Chromium not found at {CHROMIUM!r}, the browser tests need it: install chromium: apt-get install chromium"
        )
    return path


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless Chromium with a fresh profile (its own temporary user-data dir, removed at the end)."""
    path = chromium_path()
    profile = tempfile.mkdtemp(prefix="sidecar-chromium-")
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=path,
                headless=True,
                args=list(FLAGS),
                env={**os.environ, "HOME": profile, "XDG_CONFIG_HOME": profile, "XDG_CACHE_HOME": profile},
            )
            try:
                yield browser
            finally:
                await browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@asynccontextmanager
async def new_page(
    browser: Browser,
    width: int = DESKTOP["width"],
    height: int = DESKTOP["height"],
    dark: bool = False,
    user_agent: str | None = None,
    ignore_https_errors: bool = False,
) -> AsyncIterator[Page]:
    """A page in a new browser context: cookies, storage and cache of its own, like a new person (or another
    device of the same person: ``user_agent``)."""
    context: BrowserContext = await browser.new_context(
        viewport={"width": width, "height": height},
        color_scheme="dark" if dark else "light",
        locale="en-GB",
        user_agent=user_agent,
        ignore_https_errors=ignore_https_errors,  # a test front's self-signed certificate
    )
    context.set_default_timeout(STEP_TIMEOUT_MS)
    page = await context.new_page()
    _console[id(page)] = seen = []
    page.on("console", lambda message: seen.append(message.text) if message.type == "error" else None)
    try:
        yield page
    finally:
        _console.pop(id(page), None)
        await context.close()


_console: dict[int, list[str]] = {}


def console_errors(page: Page) -> list[str]:
    """The errors Chromium logged in this page so far (a Content-Security-Policy violation is one)."""
    return list(_console.get(id(page), []))


@asynccontextmanager
async def one_page(
    width: int = DESKTOP["width"], height: int = DESKTOP["height"], ignore_https_errors: bool = False
) -> AsyncIterator[Page]:
    """A Chromium of its own with one page, for a test on its own event loop (about 1.5 s to start)."""
    async with chromium() as browser, new_page(browser, width, height, ignore_https_errors=ignore_https_errors) as page:
        yield page


def watch(page: Page, prefix: str) -> list[str]:
    """Record every navigation the browser starts towards ``prefix`` (a client's redirect URI), redirects
    included; works whether or not a client listens there."""
    seen: list[str] = []

    def record(request: Request) -> None:
        if request.is_navigation_request() and request.url.startswith(prefix):
            seen.append(request.url)

    page.on("request", record)
    return seen


async def text(page: Page) -> str:
    return await page.locator("body").inner_text()


async def click_and_wait(page: Page, selector: str) -> None:
    """Click ``selector`` and wait until the navigation it starts (with all its redirects) has loaded."""
    try:
        async with page.expect_navigation(wait_until="load"):
            await page.locator(selector).first.click()
    except PlaywrightError as exc:
        # a redirect to a loopback redirect URI nobody listens on ends in a network error; ``done`` decides
        if "net::ERR_" not in str(exc):
            raise


async def step(page: Page, decision: str, user: str) -> None:
    """The one thing a person does on the page in front of them; fails on a page it does not know."""
    if await page.locator(f"button[name='user'][value='{user}']").count():  # the dev provider's sign-in
        await click_and_wait(page, f"button[name='user'][value='{user}']")
    elif await page.locator("button[name='decision']").count():  # consent
        await click_and_wait(page, f"button[name='decision'][value='{decision}']")
    elif await page.locator("input[name='user_code']").count():  # device code, pre-filled or typed
        await click_and_wait(page, "form:has(input[name='user_code']) button[type='submit']")
    else:
        raise AssertionError(f"unexpected page at {page.url}: {(await text(page))[:500]}")


async def walk(
    page: Page,
    url: str,
    done: Callable[[str, str], bool],
    decision: str = "approve",
    user: str = "alice",
) -> str:
    """Open ``url`` and act like a person until ``done(url, body text)``; returns the final body text."""
    await page.goto(url, wait_until="load")
    return await carry_on(page, done, decision, user)


async def carry_on(page: Page, done: Callable[[str, str], bool], decision: str = "approve", user: str = "alice") -> str:
    """``walk`` from the page as it is, without opening its URL again: a page that a client's script sent the
    browser to must be answered as shown (opening ``page.url`` again can cancel a newer navigation the script
    started, and answer an older request than the one the client expects)."""
    for _ in range(MAX_STEPS):
        body = await text(page)
        if done(page.url, body):
            return body
        await step(page, decision, user)
    raise AssertionError(f"not done after {MAX_STEPS} steps, at {page.url}: {(await text(page))[:500]}")


async def approve_authorization(
    page: Page, authorize_url: str, redirect_uri: str, decision: str = "approve", user: str = "alice"
) -> dict[str, str]:
    """Open an authorization URL, sign in if asked, answer the consent page, and return the query of the
    redirect to the client (code/error, state, iss), read from the browser's own request (nobody needs to
    listen on the redirect URI)."""
    seen = watch(page, redirect_uri)
    await walk(page, authorize_url, lambda _url, _body: bool(seen), decision, user)
    return dict(parse_qsl(urlsplit(seen[-1]).query))


DEVICE_FINISHED = ("Device connected", "Access denied")


async def approve_device(
    page: Page, verification_uri: str, decision: str = "approve", user: str = "alice", user_code: str = ""
) -> str:
    """Open the device page (``verification_uri_complete``, or ``verification_uri`` and type ``user_code``),
    Continue, answer the consent page, sign in where asked; returns the final page's text."""
    await page.goto(verification_uri, wait_until="load")
    for _ in range(MAX_STEPS):
        body = await text(page)
        if any(word in body for word in DEVICE_FINISHED):
            return body
        field = page.locator("input[name='user_code']")
        if user_code and await field.count() and not await field.input_value():
            await field.fill(user_code)  # typed by the person, as read from the device
        await step(page, decision, user)
    raise AssertionError(f"device approval did not finish, at {page.url}: {(await text(page))[:500]}")


@asynccontextmanager
async def other_site(host: str = "127.0.0.1") -> AsyncIterator[OtherSite]:
    """A second local origin (another port; ``localhost`` for another site) that serves pages the test writes:
    what another site's page really makes a browser send (its own Origin, Sec-Fetch-Site: same-site or
    cross-site, the cookies SameSite lets through)."""
    site = OtherSite(host)
    runner = web.AppRunner(site.app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    site.origin = f"http://{host}:{port}"
    try:
        yield site
    finally:
        await runner.cleanup()


class OtherSite:
    def __init__(self, host: str) -> None:
        self.origin = ""
        self.pages: dict[str, str] = {}
        self.app = web.Application()
        self.app.router.add_get("/{name}", self._serve)

    async def _serve(self, request: web.Request) -> web.Response:
        return web.Response(text=self.pages.get(request.match_info["name"], "nothing"), content_type="text/html")

    def form(self, name: str, action: str, fields: dict[str, str]) -> str:
        """A page with a form posting ``fields`` to ``action`` (on the sidecar); returns its URL."""
        inputs = "".join(
            f"<input type='hidden' name='{html.escape(k, quote=True)}' value='{html.escape(v, quote=True)}'>"
            for k, v in fields.items()
        )
        self.pages[name] = (
            "<!doctype html><html lang='en'><title>another site</title><main>"
            f"<form method='post' action='{html.escape(action, quote=True)}'>{inputs}"
            "<button type='submit' id='go'>Win a prize</button></form></main></html>"
        )
        return f"{self.origin}/{name}"


async def hidden_fields(page: Page, form_selector: str = "form") -> dict[str, str]:
    """The hidden inputs of a form on the page, as the browser holds them."""
    fields: dict[str, str] = await page.eval_on_selector(
        form_selector,
        "f => Object.fromEntries([...f.querySelectorAll('input[type=hidden]')].map(i => [i.name, i.value]))",
    )
    return fields


_FETCH = """async ([url, method, headers, body]) => {
    const r = await fetch(url, {method, headers, body, redirect: 'manual', credentials: 'same-origin'});
    return r.type === 'opaqueredirect' ? '' : await r.text();
}"""


async def fetch(
    page: Page, url: str, method: str = "GET", headers: dict[str, str] | None = None, body: str | None = None
) -> tuple[int, dict[str, str], str]:
    """What the page's own script gets from ``fetch(url)`` (its cookies, redirects not followed): the status and
    every response header as Chromium received them (``set-cookie`` too), and the body. Chromium sets Accept
    (``*/*`` unless the script says), Origin, Referer, Sec-Fetch-* and Cookie itself. ``url`` is absolute."""
    async with page.expect_response(lambda r: r.url == url and r.request.method == method) as answer:
        body_text: str = await page.evaluate(_FETCH, [url, method, headers or {}, body])
    response = await answer.value
    return response.status, await response.all_headers(), body_text


async def submit_form(page: Page, action: str, fields: dict[str, str], method: str = "post") -> Response:
    """The page posts a form (built in its DOM, as a page's own form) to ``action`` and Chromium navigates;
    returns the response to that navigation (after any redirect Chromium followed)."""
    async with page.expect_navigation(wait_until="load") as navigation:
        await page.evaluate(
            """([action, method, fields]) => {
                const form = document.createElement('form');
                form.method = method;
                form.action = action;
                for (const [name, value] of Object.entries(fields)) {
                    const input = document.createElement('input');
                    input.type = 'hidden';
                    input.name = name;
                    input.value = value;
                    form.appendChild(input);
                }
                document.body.appendChild(form);
                form.submit();
            }""",
            [action, method, fields],
        )
    response = await navigation.value
    assert response is not None, f"no response for the form posted to {action}"
    return response
