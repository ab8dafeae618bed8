"""The browser path's pages in real Chromium: sign-in, sign-out, sign out everywhere, the signed-out page, the
account page (sessions and applications, each ended with a click), and the error page of every status.

Nothing here sets Origin, Referer or Sec-Fetch-*; the refusal test posts from a real page of another origin.
One stack serves the module (with ``--oauth-server`` for the account page's applications, request ids in
the log so error pages show one); extra sidecars on the same provider make the failures.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlencode, urlsplit

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from playwright.async_api import Browser, Page

from sidecar.store import RedisStore
from tests.e2e import a11y
from tests.e2e import chromium as person
from tests.stack import Stack, free_port, stack
from tests.test_oauth_authorize import OAUTH, REDIRECT, authorize_params, pkce, redeem, register

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(90)]
FIREFOX_WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0"
SETTINGS = {**OAUTH, "request_logging": "true", "banner": "Example Corp", "footer": "Help: it@example.com"}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def site() -> AsyncIterator[Stack]:
    async with stack(**SETTINGS) as st:
        yield st


async def signed_in(page: Page, base: str) -> None:
    """Sign in the way a person does: open the app, get sent through the provider, land back on the app."""
    await page.goto(base + "/_demo/echo", wait_until="load")
    assert urlsplit(page.url).path == "/_demo/echo", page.url


async def userinfo_status(page: Page, base: str) -> int:
    response = await page.request.get(base + "/oauth2/userinfo")
    return response.status


async def test_sign_in_page_and_the_provider_login_in_chromium(chromium_browser: Browser, site: Stack) -> None:
    site.provider.config(auto_login=None)  # the dev provider asks who you are, like a real one
    try:
        async with person.new_page(chromium_browser, **person.PHONE) as page:
            await page.goto(site.base + "/oauth2/sign_in?rd=/_demo/echo", wait_until="load")
            assert "Example Corp" in await person.text(page)
            await a11y.inspect(page, "sign-in")
            await person.click_and_wait(page, "a.button")
            await person.step(page, "approve", "bob")  # the provider's page: pick bob
            assert urlsplit(page.url).path == "/_demo/echo", page.url
            who = await page.request.get(site.base + "/oauth2/userinfo")
            assert (await who.json())["email"] == "bob@example.org"
    finally:
        site.provider.config(auto_login="alice")


async def test_sign_out_lands_on_the_signed_out_page(chromium_browser: Browser, site: Stack) -> None:
    async with person.new_page(chromium_browser) as page:
        await signed_in(page, site.base)
        await page.goto(site.base + "/oauth2/sign_out", wait_until="load")  # through the provider's end-session
        assert urlsplit(page.url).path == "/oauth2/signed_out", page.url
        text = await person.text(page)
        assert "You are signed out of this browser" in text and "Sign in again" in text
        await a11y.inspect(page, "signed-out")
        assert await userinfo_status(page, site.base) == 401
        await person.click_and_wait(page, "a.button")  # sign in again
        assert await userinfo_status(page, site.base) == 200


async def test_sign_out_everywhere_confirms_then_ends_every_browser(chromium_browser: Browser, site: Stack) -> None:
    async with person.new_page(chromium_browser) as page, person.new_page(chromium_browser) as other:
        await signed_in(page, site.base)
        await signed_in(other, site.base)
        await page.goto(site.base + "/oauth2/sign_out?everywhere=true", wait_until="load")
        assert await userinfo_status(other, site.base) == 200, "a GET asks, it does not sign out"
        await a11y.inspect(page, "sign-out-everywhere")
        await person.click_and_wait(page, "button[type='submit']")
        assert urlsplit(page.url).path == "/oauth2/signed_out", page.url
        assert "signed out here and in every other browser" in await person.text(page)
        await a11y.inspect(page, "signed-out-everywhere")
        assert await userinfo_status(other, site.base) == 401
        assert await userinfo_status(page, site.base) == 401


async def grant(page: Page, base: str, name: str) -> str:
    reg = await register(base, client_name=name)
    verifier, challenge = pkce()
    url = f"{base}/oauth2/authorize?" + urlencode(authorize_params(reg["client_id"], challenge))
    answer = await person.approve_authorization(page, url, REDIRECT)
    status, tokens = await redeem(base, reg["client_id"], answer["code"], verifier)
    assert status == 200, tokens
    return str(tokens["access_token"])


async def token_status(base: str, token: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(base + "/mcp", json={}, headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        return resp.status


async def test_account_page_lists_sessions_and_applications_each_ended_by_a_click(
    chromium_browser: Browser, site: Stack
) -> None:
    app_name = f"Notes CLI {secrets.token_hex(3)}"
    async with (
        person.new_page(chromium_browser) as page,
        person.new_page(chromium_browser, user_agent=FIREFOX_WINDOWS) as laptop,
    ):
        await signed_in(page, site.base)
        await signed_in(laptop, site.base)
        token = await grant(page, site.base, app_name)
        await page.goto(site.base + "/oauth2/account", wait_until="load")
        rows = page.locator("tbody tr")
        this = rows.filter(has_text="(this browser)")
        assert await this.count() == 1 and "Chrome on Linux" in await this.inner_text()
        firefox = rows.filter(has_text="Firefox on Windows")
        assert await firefox.count() == 1 and "127.0.0.1" in await firefox.inner_text()
        assert await rows.filter(has_text=app_name).count() == 1
        assert await page.locator("thead th").count() == 5
        await a11y.inspect(page, "account")

        live = site.provider.live_refresh_tokens()["alice"]  # the provider's own count, as sign-out is checked
        await person.click_and_wait(page, "tr:has-text('Firefox on Windows') button")  # that laptop's session
        assert urlsplit(page.url).path == "/oauth2/account"
        assert await rows.filter(has_text="Firefox on Windows").count() == 0
        assert await userinfo_status(laptop, site.base) == 401
        assert site.provider.live_refresh_tokens().get("alice", 0) == live - 1  # revoked upstream too

        assert await token_status(site.base, token) != 401
        await person.click_and_wait(page, f"tr:has-text('{app_name}') button")  # the application
        assert await rows.filter(has_text=app_name).count() == 0
        assert await token_status(site.base, token) == 401

        await person.click_and_wait(page, "form[action*='everywhere'] button")
        assert urlsplit(page.url).path == "/oauth2/signed_out"
        assert await userinfo_status(page, site.base) == 401


async def test_ending_this_browser_on_the_account_page_signs_it_out(chromium_browser: Browser, site: Stack) -> None:
    async with person.new_page(chromium_browser) as page:
        await signed_in(page, site.base)
        await page.goto(site.base + "/oauth2/account", wait_until="load")
        await person.click_and_wait(page, "tr:has-text('(this browser)') button")
        assert urlsplit(page.url).path == "/oauth2/signed_out", page.url
        assert await userinfo_status(page, site.base) == 401


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_account_forms_posted_from_another_origin_are_refused(
    chromium_browser: Browser, site: Stack, host: str
) -> None:
    async with person.new_page(chromium_browser) as page, person.new_page(chromium_browser) as laptop:
        await signed_in(page, site.base)
        await signed_in(laptop, site.base)
        await page.goto(site.base + "/oauth2/account", wait_until="load")
        fields = await person.hidden_fields(page, "tr:not(:has-text('(this browser)')) form")
        async with person.other_site(host) as evil:
            await page.goto(evil.form("end", site.base + "/oauth2/account/revoke", fields), wait_until="load")
            async with page.expect_response(lambda r: r.request.method == "POST") as posted:
                await person.click_and_wait(page, "#go")
            assert (await posted.value).status in (401, 403), await person.text(page)
        assert await userinfo_status(laptop, site.base) == 200
        assert await userinfo_status(page, site.base) == 200


# --- error pages ------------------------------------------------------------------------------------------------


async def error_page(page: Page, url: str, status: int, name: str, *words: str) -> str:
    response = await page.goto(url, wait_until="load")
    final = response
    assert final is not None
    text = await person.text(page)
    assert final.status == status, (url, final.status, text)
    for word in words:
        assert word in text, (word, text)
    assert "Request id:" in text, text
    assert "Example Corp" in text and "Help: it@example.com" in text
    await a11y.inspect(page, name)
    return text


async def plain(url: str) -> tuple[int, str, str]:
    """What an API client (no ``Accept: text/html``) gets for the same failure."""
    async with aiohttp.ClientSession() as http, http.get(url, allow_redirects=False) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def test_error_pages_of_every_status_in_chromium(chromium_browser: Browser, site: Stack) -> None:
    denied = await site.add_sidecar(email_domain="example.org", request_logging="true", **_branding())
    limited = await site.add_sidecar(signin_rate_limit="1", request_logging="true", **_branding())
    upstream_down = await site.add_sidecar(
        upstream=f"http://127.0.0.1:{free_port()}/", request_logging="true", **_branding()
    )
    wrong_secret = await site.add_sidecar(client_secret="not-the-secret", request_logging="true", **_branding())
    dead_redis = RedisStore(aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1))
    store_down = await site.add_sidecar(dead_redis, request_logging="true", **_branding())
    try:
        async with person.new_page(chromium_browser) as page:
            await error_page(page, site.base + "/oauth2/callback?state=x&code=y", 400, "error-400", "Sign-in expired")
            text = await error_page(page, denied + "/_demo/echo", 403, "error-403", "alice@example.com")
            assert "Sign in as someone else" in text
            for _ in range(2):
                await page.goto(limited + "/oauth2/start?rd=/", wait_until="load")
            await error_page(page, limited + "/oauth2/start?rd=/", 429, "error-429", "Too many")
            await error_page(page, wrong_secret + "/_demo/echo", 502, "error-502-sign-in", "misconfigured")
            await error_page(page, store_down + "/_demo/echo", 503, "error-503", "Temporarily unavailable")
        async with person.new_page(chromium_browser) as page:
            await signed_in(page, upstream_down)
            await error_page(page, upstream_down + "/_demo/echo", 502, "error-502-app", "not answering")
    finally:
        await dead_redis.close()
    status, kind, body = await plain(site.base + "/oauth2/callback?state=x&code=y")
    assert status == 400 and kind.startswith("text/plain") and body.startswith("400 Sign-in expired:"), body
    status, kind, body = await plain(limited + "/oauth2/start?rd=/")
    assert (status, body) == (429, "429 Too Many Requests: too many sign-in attempts, try again shortly\n"), body


def _branding() -> dict[str, str]:
    return {"banner": SETTINGS["banner"], "footer": SETTINGS["footer"]}
