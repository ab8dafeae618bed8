"""The OAuth pages in real Chromium: consent (Allow, Deny), the device flow (Continue, Allow, Deny), Revoke.

Chromium sets Origin, Referer and Sec-Fetch-* itself; nothing here sets them. One stack (memory store, dev
provider signing in as alice) serves the module, one Chromium serves the run; each test has its own cookies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote, urlencode, urlsplit

import pytest
import pytest_asyncio
from playwright.async_api import Browser

from tests.e2e import chromium as person
from tests.stack import Stack, stack
from tests.test_oauth_authorize import OAUTH, REDIRECT, authorize_params, pkce, redeem, register

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def oauth() -> AsyncIterator[Stack]:
    async with stack(**OAUTH) as st:
        yield st


async def test_consent_allow_in_chromium_hands_a_code_the_token_endpoint_redeems(
    chromium_browser: Browser, oauth: Stack
) -> None:
    reg = await register(oauth.base)
    verifier, challenge = pkce()
    url = f"{oauth.base}/oauth2/authorize?" + urlencode(authorize_params(reg["client_id"], challenge, state="s1"))
    async with person.new_page(chromium_browser) as page:
        answer = await person.approve_authorization(page, url, REDIRECT)
    assert answer["state"] == "s1" and answer["iss"] == oauth.base, answer
    status, tokens = await redeem(oauth.base, reg["client_id"], answer["code"], verifier)
    assert status == 200 and tokens["refresh_token"], tokens


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
        await page.goto(url, wait_until="load")  # not signed in: the upstream sign-in (automatic) first
        assert urlsplit(page.url).path == "/oauth2/authorize", (page.url, await person.text(page))
        assert await page.locator("button[name='decision'][value='approve']").count() == 1
        answer = await person.approve_authorization(page, url, REDIRECT)
    assert answer["state"] == "s2", answer
    status, _ = await redeem(oauth.base, reg["client_id"], answer["code"], verifier)
    assert status == 200
