"""/oauth2/auth never hands the provider's tokens to a page's script: only to a named front."""

from __future__ import annotations

import aiohttp

from sidecar.store import MemoryStore
from tests.e2e.chromium import fetch, one_page
from tests.stack import app_token, browser, sign_in, stack

TOKENS = {"pass_access_token": "true", "pass_authorization_header": "true"}
BROWSER_LIKE = [
    {},
    {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "empty"},
    {"Origin": "http://127.0.0.1", "X-Requested-With": "XMLHttpRequest"},
    {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"},
]


async def _auth_headers(client: aiohttp.ClientSession, base: str, extra: dict[str, str]) -> dict[str, str]:
    async with client.get(f"{base}/oauth2/auth", headers=extra) as resp:
        assert resp.status == 202
        return dict(resp.headers)


async def test_in_reverse_proxy_mode_the_auth_endpoint_carries_identity_but_never_tokens() -> None:
    async with stack(MemoryStore(), **TOKENS) as st, browser() as client:
        await sign_in(client, st.base)
        for extra in BROWSER_LIKE:
            headers = await _auth_headers(client, st.base, extra)
            assert headers["X-Auth-Request-User"] == "alice@example.com"
            assert "X-Auth-Request-Access-Token" not in headers and "Authorization" not in headers
        assert (await app_token(client, st.base) or "").startswith("ey")  # the app still gets it


async def test_as_an_auth_request_target_tokens_go_only_to_trusted_fronts() -> None:
    async with stack(MemoryStore(), upstream="", reverse_proxy="true", **TOKENS) as st, browser() as client:
        await sign_in(client, st.base)
        headers = await _auth_headers(client, st.base, {})  # loopback: the default --trusted-proxy
        assert headers["X-Auth-Request-Access-Token"].startswith("ey")
        assert headers["Authorization"] == "Bearer " + headers["X-Auth-Request-Access-Token"]
    async with stack(MemoryStore(), upstream="", trusted_proxy="10.0.0.0/8", **TOKENS) as st, browser() as client:
        await sign_in(client, st.base)
        for extra in BROWSER_LIKE:
            headers = await _auth_headers(client, st.base, extra)
            assert headers["X-Auth-Request-User"] == "alice@example.com"
            assert "X-Auth-Request-Access-Token" not in headers and "Authorization" not in headers


async def test_without_reverse_proxy_no_peer_is_a_trusted_front() -> None:
    async with stack(MemoryStore(), upstream="", **TOKENS) as st, browser() as client:
        await sign_in(client, st.base)
        headers = await _auth_headers(client, st.base, {"Cookie": "app=1"})
        assert "X-Auth-Request-Access-Token" not in headers and "Authorization" not in headers
        assert "Cookie" not in headers  # the app's HttpOnly cookies are not echoed either


async def test_a_pages_own_script_in_chromium_never_reads_tokens_from_the_auth_endpoint() -> None:
    """The real counterpart of BROWSER_LIKE (embedded, with upstreams): Chromium signs in, then a script of the
    app's page calls fetch('/oauth2/auth') with the browser's cookies; Chromium sets Origin, Sec-Fetch-* and
    Cookie itself. (Behind a front, the front never routes /oauth2/auth: tests/e2e/test_nginx.py.)"""
    async with stack(MemoryStore(), **TOKENS) as st, one_page() as page:
        response = await page.goto(st.base + "/_demo/echo", wait_until="load")  # signed in on the way (auto-login)
        assert response is not None and response.status == 200 and page.url == st.base + "/_demo/echo"
        token = (await response.json())["headers"]["X-Auth-Request-Access-Token"]
        assert token.startswith("ey")  # the app itself does get it, on a proxied request
        for headers in ({}, {"X-Requested-With": "XMLHttpRequest"}, {"Accept": "application/json"}):
            status, answer, body = await fetch(page, st.base + "/oauth2/auth", headers=headers)
            assert status == 202 and answer["x-auth-request-user"] == "alice@example.com", headers
            assert "x-auth-request-access-token" not in answer and "authorization" not in answer, headers
            assert token not in repr(answer) and token not in body, headers
