"""The OAuth pages in real Chromium: consent (Allow, Deny), the device flow (Continue, Allow, Deny), Revoke on
the grants page, and another site's page posting those forms.

Chromium sets Origin, Referer and Sec-Fetch-* itself; nothing here sets them. One stack (memory store, dev
provider signing in as alice) serves the module, one Chromium serves the run; each test has its own cookies.
Every page of ours that a test reaches is checked by axe-core and photographed (``a11y.inspect``).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Route

from tests.e2e import a11y
from tests.e2e import chromium as person
from tests.stack import Stack, stack
from tests.test_oauth_authorize import OAUTH, REDIRECT, authorize_params, pkce, redeem, register
from tests.test_oauth_device import device_client, poll, start_device

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(90)]
# right-to-left letters are a legitimate name (bidi controls are refused at registration); <bdi> keeps them
# from reordering the sentence around them
BIDI_NAME = "\u05d2\u05d9\u05d1\u05d5\u05d9 backup.www"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def oauth() -> AsyncIterator[Stack]:
    async with stack(
        **OAUTH, oauth_device_poll_interval="1s", banner="Example Corp single sign-on", footer="Help: it@example.com"
    ) as st:
        yield st


def authorize_url(base: str, client_id: str, challenge: str, **extra: str) -> str:
    return f"{base}/oauth2/authorize?" + urlencode(authorize_params(client_id, challenge, **extra))


async def to_consent(page: Page, url: str) -> None:
    """Open an authorization URL in a fresh browser: the upstream sign-in (automatic), then the consent page."""
    await page.goto(url, wait_until="load")
    assert urlsplit(page.url).path == "/oauth2/authorize", (page.url, await person.text(page))
    assert await page.locator("button[name='decision'][value='approve']").count() == 1


async def test_consent_allow_in_chromium_hands_a_code_the_token_endpoint_redeems(
    chromium_browser: Browser, oauth: Stack
) -> None:
    reg = await register(oauth.base, client_name=BIDI_NAME)
    verifier, challenge = pkce()
    url = authorize_url(oauth.base, reg["client_id"], challenge, state="s1")
    async with person.new_page(chromium_browser) as page:
        await to_consent(page, url)
        text = await person.text(page)
        assert "Example Corp single sign-on" in text and "Help: it@example.com" in text
        assert "not verified" in text and "sign-in may appear once more" in text
        assert await page.locator("bdi", has_text=BIDI_NAME).count() == 1  # isolated
        await a11y.inspect(page, "consent")
        answer = await person.approve_authorization(page, url, REDIRECT)
    assert answer["state"] == "s1" and answer["iss"] == oauth.base, answer
    status, tokens = await redeem(oauth.base, reg["client_id"], answer["code"], verifier)
    assert status == 200 and tokens["refresh_token"], tokens


async def test_consent_allow_on_a_phone_in_dark_mode(chromium_browser: Browser, oauth: Stack) -> None:
    reg = await register(oauth.base)
    verifier, challenge = pkce()
    url = authorize_url(oauth.base, reg["client_id"], challenge, state="s3")
    async with person.new_page(chromium_browser, **person.PHONE, dark=True) as page:
        await to_consent(page, url)
        box = await page.locator("button[value='approve']").bounding_box()
        assert box is not None and box["height"] >= 44 and box["width"] >= 44, box
        assert await page.evaluate("parseFloat(getComputedStyle(document.body).fontSize)") >= 16
        answer = await person.approve_authorization(page, url, REDIRECT)
    status, _ = await redeem(oauth.base, reg["client_id"], answer["code"], verifier)
    assert status == 200


async def test_consent_behind_a_front_that_hides_the_referrer(chromium_browser: Browser, oauth: Stack) -> None:
    """A front (or an operator's template) answering with ``Referrer-Policy: no-referrer``: Chromium then posts
    our own form with ``Origin: null`` and ``Sec-Fetch-Site: same-origin``, which must be accepted."""
    reg = await register(oauth.base)
    verifier, challenge = pkce()
    url = authorize_url(oauth.base, reg["client_id"], challenge, state="s5")

    async def no_referrer(route: Route) -> None:
        response = await route.fetch(max_redirects=0)
        await route.fulfill(response=response, headers={**response.headers, "referrer-policy": "no-referrer"})

    async with person.new_page(chromium_browser) as page:
        await to_consent(page, url)
        await page.route(f"{oauth.base}/oauth2/authorize?*", no_referrer)
        await page.reload(wait_until="load")
        async with page.expect_request(lambda r: r.method == "POST") as posted:
            answer = await person.approve_authorization(page, page.url, REDIRECT)
        sent = await (await posted.value).all_headers()
    # Origin: null reached the sidecar and was accepted: only with Sec-Fetch-Site same-origin (Playwright's copy
    # of the request headers may lack the Sec-Fetch-* ones the network stack adds)
    assert sent.get("origin") == "null" and sent.get("sec-fetch-site", "same-origin") == "same-origin", sent
    status, _ = await redeem(oauth.base, reg["client_id"], answer["code"], verifier)
    assert status == 200


async def test_consent_deny_in_chromium_sends_access_denied_to_the_client(
    chromium_browser: Browser, oauth: Stack
) -> None:
    reg = await register(oauth.base)
    _, challenge = pkce()
    url = authorize_url(oauth.base, reg["client_id"], challenge, state="s4")
    async with person.new_page(chromium_browser) as page:
        answer = await person.approve_authorization(page, url, REDIRECT, decision="deny")
    assert answer == {"error": "access_denied", "state": "s4", "iss": oauth.base}, answer


async def test_authorize_with_percent_20_spaces_comes_back_to_consent_after_the_sign_in(
    chromium_browser: Browser, oauth: Stack
) -> None:
    """mcp-remote opens its URL through encodeURIComponent (``scope=openid%20email``): after the upstream
    sign-in the browser must return to the consent page, not end at ``/``."""
    reg = await register(oauth.base)
    verifier, challenge = pkce()
    params = authorize_params(reg["client_id"], challenge, state="s2", resource=f"{oauth.base}/mcp")
    url = f"{oauth.base}/oauth2/authorize?" + urlencode(params, quote_via=quote)
    assert "%20" in url
    async with person.new_page(chromium_browser) as page:
        await to_consent(page, url)
        answer = await person.approve_authorization(page, url, REDIRECT)
    assert answer["state"] == "s2", answer
    status, _ = await redeem(oauth.base, reg["client_id"], answer["code"], verifier)
    assert status == 200


async def test_authorization_error_page_for_an_unknown_client(chromium_browser: Browser, oauth: Stack) -> None:
    _, challenge = pkce()
    async with person.new_page(chromium_browser) as page:
        response = await page.goto(authorize_url(oauth.base, "no-such-client", challenge), wait_until="load")
        assert response is not None and response.status == 400
        assert "not registered" in await person.text(page)
        await a11y.inspect(page, "authorize-error")


# --- the device flow -------------------------------------------------------------------------------------------


async def device_flow(oauth: Stack, name: str = "Printer CLI") -> tuple[dict[str, Any], dict[str, Any]]:
    reg = await device_client(oauth.base, client_name=name)
    status, answer = await start_device(oauth.base, {"client_id": reg["client_id"], "scope": "openid offline_access"})
    assert status == 200, answer
    return reg, answer


async def test_device_flow_typed_code_continue_allow_in_chromium(chromium_browser: Browser, oauth: Stack) -> None:
    reg, answer = await device_flow(oauth)
    async with person.new_page(chromium_browser, **person.PHONE) as page:
        await page.goto(answer["verification_uri"], wait_until="load")  # sign-in first, then the entry form
        assert await page.get_by_label("Code from your device").count() == 1
        await a11y.inspect(page, "device-entry")
        await page.get_by_label("Code from your device").fill(answer["user_code"].lower().replace("-", " "))
        await person.click_and_wait(page, "form:has(input[name='user_code']) button[type='submit']")
        text = await person.text(page)
        assert answer["user_code"] in text, text  # the code again
        assert "127.0.0.1" in text and " UTC" in text  # where and when the device asked
        assert "not verified" in text and "If someone sent you this link or code, choose Deny." in text
        await a11y.inspect(page, "device-consent")
        await person.click_and_wait(page, "button[name='decision'][value='approve']")
        for _ in range(3):  # the grant's own sign-in at the provider (automatic) ends on "Device connected"
            if "Device connected" in await person.text(page):
                break
            await page.wait_for_load_state("load")
        assert "Device connected" in await person.text(page)
        await a11y.inspect(page, "device-connected")
    await asyncio.sleep(1.1)
    status, tokens = await poll(oauth.base, reg["client_id"], answer["device_code"])
    assert status == 200 and tokens["refresh_token"], tokens


async def test_device_flow_link_deny_in_chromium(chromium_browser: Browser, oauth: Stack) -> None:
    reg, answer = await device_flow(oauth, "Unknown gadget")
    async with person.new_page(chromium_browser) as page:
        text = await person.approve_device(page, answer["verification_uri_complete"], decision="deny")
        assert "Access denied" in text
        await a11y.inspect(page, "device-denied")
    await asyncio.sleep(1.1)
    status, body = await poll(oauth.base, reg["client_id"], answer["device_code"])
    assert (status, body["error"]) == (400, "access_denied")


# --- the grants page -------------------------------------------------------------------------------------------


async def grant_in(page: Page, oauth: Stack, name: str) -> dict[str, Any]:
    """A code-flow grant approved in ``page``'s browser; returns the token response."""
    reg = await register(oauth.base, client_name=name)
    verifier, challenge = pkce()
    answer = await person.approve_authorization(page, authorize_url(oauth.base, reg["client_id"], challenge), REDIRECT)
    status, tokens = await redeem(oauth.base, reg["client_id"], answer["code"], verifier)
    assert status == 200, tokens
    return {**tokens, "client_id": reg["client_id"]}


async def mcp_status(base: str, token: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(base + "/mcp", json={}, headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        return resp.status


async def test_revoke_on_the_grants_page_in_chromium(chromium_browser: Browser, oauth: Stack) -> None:
    mark = secrets.token_hex(4)
    async with person.new_page(chromium_browser) as page:
        tokens = await grant_in(page, oauth, f"Backup {mark} \u05d2\u05d9\u05d1\u05d5\u05d9.www")
        assert await mcp_status(oauth.base, tokens["access_token"]) != 401
        await page.goto(oauth.base + "/oauth2/grants", wait_until="load")
        assert await page.locator("th").count() == 6
        assert await page.locator("bdi", has_text=f"Backup {mark} \u05d2\u05d9\u05d1\u05d5\u05d9.www").count() == 1
        await a11y.inspect(page, "grants")
        await person.click_and_wait(page, f"tr:has-text('{mark}') button:has-text('Revoke')")
        assert urlsplit(page.url).path == "/oauth2/grants"
        assert mark not in await person.text(page)
    assert await mcp_status(oauth.base, tokens["access_token"]) == 401


# --- another site's page posting our forms ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_forms_posted_from_another_origin_are_refused(chromium_browser: Browser, oauth: Stack, host: str) -> None:
    """The victim's own form fields (CSRF token included) on a page of another origin (same site on another
    port: the cookie goes along; or another site), submitted by a click in the victim's browser: refused."""
    reg = await register(oauth.base)
    _, challenge = pkce()
    _, device = await device_flow(oauth)
    async with person.new_page(chromium_browser) as page, person.other_site(host) as evil:
        victim = f"Victim tool {secrets.token_hex(4)}"
        tokens = await grant_in(page, oauth, victim)
        seen = person.watch(page, REDIRECT)
        await to_consent(page, authorize_url(oauth.base, reg["client_id"], challenge))
        consent = await person.hidden_fields(page)
        await page.goto(f"{oauth.base}/oauth2/device", wait_until="load")
        entry = await person.hidden_fields(page)
        await page.goto(f"{oauth.base}/oauth2/grants", wait_until="load")
        grants = await person.hidden_fields(page, f"tr:has-text('{victim}') form")
        attacks = [
            ("consent", "/oauth2/consent", {**consent, "decision": "approve"}),
            ("device", "/oauth2/device", {**entry, "user_code": device["user_code"]}),
            ("revoke", "/oauth2/grants/revoke", grants),
            ("everywhere", "/oauth2/sign_out?everywhere=true", {}),
        ]
        for name, path, fields in attacks:
            await page.goto(evil.form(name, oauth.base + path, fields), wait_until="load")
            async with page.expect_response(lambda r: r.request.method == "POST") as posted:
                await person.click_and_wait(page, "#go")
            status = (await posted.value).status
            text = await person.text(page)
            assert status in (401, 403), (name, status, text)
            assert "Allow" not in text and "Device connected" not in text, (name, text)
            if name == "consent":
                await a11y.inspect(page, f"refused-{host}")
        assert not seen, "no code went to the client"
        await page.goto(f"{oauth.base}/oauth2/grants", wait_until="load")
        assert victim in await person.text(page), "the grant was not revoked"
    assert await mcp_status(oauth.base, tokens["access_token"]) != 401, "still signed in everywhere"
